"""The official Diff-Plugin code (inference, the demo, one training step) rebuilt from the reference libraries
(diffusers, transformers): the oracle the parity tests (tests/) and tools/bench/benchmark.py compare minidiff with.
Not a command-line tool; tests put tools/ on sys.path through tests/helpers.py.

Mirrors yuhaoliu7456/Diff-Plugin @ 79e12bb (infer.py, demo.py, train.py, modules/TPB.py, modules/SCB.py) as
described in shared/reference/official-facts.md sections 1-3, with tiny random models written in the
OFFICIAL file layouts: SD as a diffusers folder (unet/, vae/, text_encoder/), CLIP as a transformers folder,
each plugin as `<task>/scb/{config.json, diffusion_pytorch_model.bin}` + `<task>/tpb.pt` ({'model': sd}), the
selector as PromptTunner.pt. No minidiff import here: tests load these files through minidiff's loaders and
compare.

Deviations from the official environment, each numerically neutral for the comparison: diffusers 0.35.2, not
0.17 (UniPC with final_sigmas_type="sigma_min" = 0.17's last step; the SCB residuals passed as the 12-entry
list plus a zero mid residual, the only way current diffusers keeps 0.17's zip-add skip semantics, facts
1.9-1.10); transformers 4.57 CLIPImageProcessor (the 4.x PIL path). The tiny CLIP vision model has 24 layers,
so hidden_states[24] is taken exactly as the official TPB does. Training (make_full_models,
official_training_loss) runs at full SD-1.5 / ViT-L/14 size, where [24] is also [-1].
"""
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT_SCALE = 0.18215  # official infer.py literal
SD14_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None, "clip_sample": False}  # SD-1.4's PNDM config
CH, CTX, HEADS, CLIP_W = 32, 32, 2, 128  # tiny widths: UNet/SCB level 0, context, SCB heads, CLIP vision
SHARPEN = 4.0  # factor on the tiny UNet's cross-attention keys/outputs and conv_out (see make_sd_and_clip)


class RefTPB(nn.Module):
    """modules/TPB.py TPBNet: [Linear, LayerNorm, LeakyReLU] x 2 + Linear, on hidden_states[24][:, 1:]."""

    def __init__(self, d=CLIP_W, out=CTX):
        super().__init__()
        self.visual_projection = nn.Sequential(
            nn.Linear(d, d), nn.LayerNorm(d), nn.LeakyReLU(),
            nn.Linear(d, d), nn.LayerNorm(d), nn.LeakyReLU(), nn.Linear(d, out))

    def forward(self, clip_hidden_states):
        return self.visual_projection(clip_hidden_states[24][:, 1:, :])


class RefSCB(nn.Module):
    """modules/SCB.py SCBNet with config.json's settings: one CrossAttnDownBlock2D without downsampler."""

    def __init__(self, ch=CH, heads=HEADS, ctx=CTX):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
        self.controlnet_cond_embedding = nn.Conv2d(4, ch, 3, padding=1)
        self.time_proj = Timesteps(ch, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch, 4 * ch, act_fn="silu")
        self.down_blocks = nn.ModuleList([CrossAttnDownBlock2D(
            in_channels=ch, out_channels=ch, temb_channels=4 * ch, num_layers=2, resnet_eps=1e-5,
            resnet_act_fn="silu", resnet_groups=32, num_attention_heads=heads, cross_attention_dim=ctx,
            downsample_padding=1, add_downsample=False)])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(ch, ch, 1) for _ in range(3)])

    def forward(self, sample, timestep, encoder_hidden_states, cond_img):
        t = timestep.reshape(-1).expand(cond_img.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(cond_img.dtype))
        sample = self.controlnet_cond_embedding(cond_img)  # SCB.py l.421: the noisy sample is overwritten
        res = (sample,)
        sample, states = self.down_blocks[0](sample, emb, encoder_hidden_states=encoder_hidden_states)
        res += states
        out = [conv(r) for conv, r in zip(self.controlnet_down_blocks, res)]
        return out + [torch.zeros(1)] * 9  # SCB.py l.467-470: padded to the UNet's 12 skips


def scb_config(ch=CH, heads=HEADS, ctx=CTX):
    """An scb/config.json as the released ones (derain's keys + the extra ignored ones), tiny sizes."""
    return {"_class_name": "SCBNet", "_diffusers_version": "0.17.1", "act_fn": "silu",
            "attention_head_dim": heads, "block_out_channels": [ch], "class_embed_type": None,
            "conditioning_embedding_out_channels": [16, 32],
            "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": ctx,
            "down_block_types": ["CrossAttnDownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True,
            "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
            "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
            "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
            "concat_input": False, "enable_mask": False, "use_vae_conditioning": True}


def make_plugin(folder, seed, module_prefix=False, full=False):
    """Random official plugin (zero convs made non-zero so they matter) written to `folder` -> (tpb, scb).
    full=True: the released sizes (TPB 1024 -> 768, SCB 320 channels, 8 heads, context 768)."""
    torch.manual_seed(seed)
    tpb, scb = (RefTPB(1024, 768), RefSCB(320, 8, 768)) if full else (RefTPB(), RefSCB())
    with torch.no_grad():
        for conv in scb.controlnet_down_blocks:
            nn.init.normal_(conv.weight, std=0.3)
            nn.init.normal_(conv.bias, std=0.1)
        tpb.visual_projection[6].weight.mul_(SHARPEN)  # larger tokens: the image content shows in the output
    os.makedirs(os.path.join(folder, "scb"), exist_ok=True)
    with open(os.path.join(folder, "scb", "config.json"), "w") as f:
        json.dump(scb_config(320, 8, 768) if full else scb_config(), f, indent=2)
    torch.save(scb.state_dict(), os.path.join(folder, "scb", "diffusion_pytorch_model.bin"))
    sd = tpb.state_dict()
    torch.save({"model": {("module." if module_prefix else "") + k: v for k, v in sd.items()}},
               os.path.join(folder, "tpb.pt"))
    return tpb.eval(), scb.eval()


def make_sd_and_clip(root, seed=0):
    """Tiny SD as a diffusers folder (12 skips as SD 1.x, 8x VAE) and a 24-layer tiny CLIP vision folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(CH, 2 * CH, 2 * CH, 2 * CH), layers_per_block=2, cross_attention_dim=CTX,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=CTX, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=1,
                                        max_position_embeddings=77,
                                        eos_token_id=2, hidden_act="quick_gelu"))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_W, intermediate_size=256, num_hidden_layers=24,
                                            num_attention_heads=2, image_size=224, patch_size=14,
                                            hidden_act="quick_gelu"))
    # Default init gives near-uniform cross-attention and a small eps: a wrong context or skip would barely
    # change the image. Sharpen it so the comparison sees them (checked: a wrong CLIP image, a zero SCB or
    # another seed change pixels by 8, 86 and 217 levels).
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "attn2.to_k" in name or "attn2.to_out.0.weight" in name or name == "conv_out.weight":
                p.mul_(SHARPEN)
    for m in (unet, vae, text, clip):
        m.eval()
    unet.save_pretrained(os.path.join(root, "sd", "unet"))
    vae.save_pretrained(os.path.join(root, "sd", "vae"))
    text.save_pretrained(os.path.join(root, "sd", "text_encoder"))
    clip.save_pretrained(os.path.join(root, "clip"))
    return unet, vae, text, clip


@torch.no_grad()
def official_restore(unet, vae, clip, plugins, original, image, steps=20, chain_steps=3, seed=42):
    """infer.py/demo.py loop: CLIP features of `original`; plugins (task, tpb, scb) in turn on `image`."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPImageProcessor
    pixels = CLIPImageProcessor()(images=original, return_tensors="pt").pixel_values
    hidden = clip(pixels, output_attentions=True, output_hidden_states=True).hidden_states
    proc = VaeImageProcessor(vae_scale_factor=8)
    for k, (task, tpb, scb) in enumerate(plugins):
        tokens = tpb(hidden)  # [1, 256, CTX]
        x = proc.preprocess(image, height=image.height, width=image.width)  # LANCZOS to multiples of 8
        scb_cond = LATENT_SCALE * vae.encode(x).latent_dist.mode()
        h, w = scb_cond.shape[2:]
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, 4, h, w), generator=g)
        random_start = task in ("lowlight", "highlight")
        sched = UniPCMultistepScheduler.from_config(SD14_SCHEDULER, final_sigmas_type="sigma_min")
        sched.set_timesteps(steps if k == 0 else chain_steps)
        latents = noise
        for t in sched.timesteps:
            if t >= 960 and not random_start:
                latents = sched.add_noise(scb_cond, noise, t.reshape(1))
            res = scb(latents, t, encoder_hidden_states=tokens, cond_img=scb_cond)
            eps = unet(latents, t, encoder_hidden_states=tokens, down_block_additional_residuals=res,
                       mid_block_additional_residual=torch.zeros(1)).sample
            latents = sched.step(eps, t, latents).prev_sample
        out = vae.decode(latents / LATENT_SCALE).sample
        image = proc.postprocess(out, output_type="pil")[0]
    return image


class RefSelector(nn.Module):
    """modules/prompt.py PromptTunnerModel(tunner_for_visual=True)."""

    def __init__(self, d=CTX):
        super().__init__()
        self.proj_v, self.proj_t = nn.Linear(d, d), nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(self, plug_in_embeddings, text):
        # plug_in_embeddings [N, 256, D], text [1, 1, D] -> [N, 1]
        v = F.max_pool1d(plug_in_embeddings.permute(0, 2, 1), kernel_size=plug_in_embeddings.shape[1])
        v = self.proj_v(v.permute(0, 2, 1))  # [N, 1, D]
        v = v / v.norm(dim=-1, keepdim=True)
        t = self.proj_t(text).squeeze(1).repeat(v.shape[0], 1, 1)  # [N, 1, D]
        t = t / t.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * (v * t).sum(-1)


@torch.no_grad()
def official_scores(selector, text_model, tokenizer, clip, tpbs, original, prompt):
    """demo.py l.98-160 scores: TPB tokens per task + the pooled " " row, text = pooled prompt embedding."""
    from transformers import CLIPImageProcessor
    pixels = CLIPImageProcessor()(images=original, return_tensors="pt").pixel_values
    hidden = clip(pixels, output_hidden_states=True).hidden_states

    def pooled(text):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        return text_model(ids)[1].unsqueeze(1)  # [1, 1, D]

    rows = [tpb(hidden)[0] for tpb in tpbs] + [pooled(" ")[0].expand(256, -1)]
    return selector(torch.stack(rows), pooled(prompt))[:, 0]  # [N + 1]


# --------------------------------------------------------------------------------------------------------
# Training (train.py l.140-189, 313-367; facts section 3), at full size: SD-1.5 UNet + VAE, CLIP ViT-L/14.

def make_full_models(root, seed=0):
    """Random full-size SD-1.5 UNet and VAE as a diffusers folder `root/sd` and CLIP ViT-L/14 vision as a
    transformers folder `root/clip` (the layouts train.py loads) -> (unet, vae, clip), eval mode. The
    folder's text_encoder/ is tiny: training never runs it, a loader only needs one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the defaults are SD 1.x's
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=1, eos_token_id=2, hidden_act="quick_gelu"))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, image_size=224, patch_size=14,
                                            hidden_act="quick_gelu"))
    for m, sub in ((unet, "sd/unet"), (vae, "sd/vae"), (text, "sd/text_encoder"), (clip, "clip")):
        m.eval().save_pretrained(os.path.join(root, sub))
    return unet, vae, clip


def official_training_loss(vae, unet, image_encoder, tpb_net, scb_net, pixel_values,
                           conditioning_pixel_values, noise, timesteps, latent_generator=None):
    """train.py l.313-367, one batch: pixel_values = clean photos (the CSV's `image` column),
    conditioning_pixel_values = degraded ones, [B, 3, H, W] in [-1, 1]. The official code draws the noise
    (randn_like), the timesteps (randint) and the posterior sample (latent_dist.sample()); here they come
    in: `noise`, `timesteps` and the generator the posterior sample is drawn with. weight_dtype is the
    frozen networks' dtype; the plugin keeps its own (fp32 master weights; the official code would cast
    it too under mixed precision, facts 7), so its outputs are cast to weight_dtype at the UNet's door."""
    from diffusers import DDPMScheduler
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    noise_scheduler = DDPMScheduler.from_config(SD14_SCHEDULER)  # from SD's scheduler/ (l.142)
    weight_dtype = unet.dtype
    latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample(generator=latent_generator)
    latents = latents * vae.config.scaling_factor
    noisy_latents = noise_scheduler.add_noise(latents, noise.to(weight_dtype), timesteps)
    image_mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1).to(dtype=weight_dtype)
    image_std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1).to(dtype=weight_dtype)
    normalized_pixel_values = (conditioning_pixel_values.to(dtype=weight_dtype) + 1.0) / 2.0
    normalized_pixel_values = F.interpolate(normalized_pixel_values, size=(224, 224), mode="bilinear",
                                            align_corners=False)
    normalized_pixel_values = (normalized_pixel_values - image_mean) / image_std
    clip_visual_input = image_encoder(normalized_pixel_values, output_attentions=True,
                                      output_hidden_states=True)
    plugin_dtype = next(tpb_net.parameters()).dtype
    visual_prompt_guidance = tpb_net([h.to(plugin_dtype) for h in clip_visual_input.hidden_states])
    content_image = conditioning_pixel_values.to(dtype=weight_dtype)
    moments = vae.quant_conv(vae.encoder(content_image))  # [B, 8, h, w]: mean and logvar
    scb_cond = vae.config.scaling_factor * torch.chunk(moments, 2, dim=1)[0]  # posterior MEAN (l.342)
    down_block_res_samples = scb_net(noisy_latents.to(plugin_dtype), timesteps,
                                     encoder_hidden_states=visual_prompt_guidance,
                                     cond_img=scb_cond.to(plugin_dtype))
    # diffusers >= 0.22 keeps 0.17's zip-add of the 12 residuals only with a mid residual (facts 1.9)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=visual_prompt_guidance.to(weight_dtype),
                      down_block_additional_residuals=[r.to(weight_dtype) for r in down_block_res_samples],
                      mid_block_additional_residual=torch.zeros(1, dtype=weight_dtype)).sample
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")  # epsilon prediction


def official_optimizer(scb_net, tpb_net, lr=1e-5):
    """train.py l.178-189: AdamW over SCB then TPB (one group each), betas (0.9, 0.999), wd 1e-2, eps 1e-8."""
    groups = [{"params": scb_net.parameters(), "lr": lr}, {"params": tpb_net.parameters(), "lr": lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def official_update(scb_net, tpb_net, optimizer, max_grad_norm=1.0):
    """train.py l.354-361 after accelerator.backward(loss): clip SCB and TPB separately, step, zero."""
    torch.nn.utils.clip_grad_norm_(scb_net.parameters(), max_grad_norm)
    torch.nn.utils.clip_grad_norm_(tpb_net.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------------
# The official entry points end to end: infer.py's and demo.py's resize rules, and demo.py's whole `process`
# (selection, resize, the chained plugins), transcribed line by line.

def infer_resize(image):
    """infer.py l.96-107 verbatim -> (image, new_width, new_height)."""
    width, height = image.size
    if width < 512 or height < 512:
        if width < height:
            new_width = 512
            new_height = int((512 / width) * height)
        else:
            new_height = 512
            new_width = int((512 / height) * width)
        image = image.resize((new_width, new_height))
    else:
        new_height = height
        new_width = width
    return image, new_width, new_height


def demo_resize(image, image_resolution=512):
    """demo.py l.166-173 verbatim -> (image, new_width, new_height)."""
    width, height = image.size
    if width < height:
        new_width = image_resolution
        new_height = int((image_resolution / width) * height)
    else:
        new_height = image_resolution
        new_width = int((image_resolution / height) * width)
    image = image.resize((new_width, new_height))
    return image, new_width, new_height


PIL_LANCZOS = 1  # PIL.Image.LANCZOS, diffusers' PIL_INTERPOLATION["lanczos"]


def vae_preprocess_resize(image, height, width, vae_scale_factor=8):
    """diffusers 0.17 VaeImageProcessor.resize (image_processor.py), what preprocess(image, height, width)
    does to a PIL image before the tensor conversion: a LANCZOS rescale to multiples of 8."""
    width, height = (x - x % vae_scale_factor for x in (width, height))
    return image.resize((width, height), resample=PIL_LANCZOS)


def _encode_prompt(prompt, tokenizer, text_encoder):
    """utils.py _encode_prompt with use_global_text=True (demo.py l.98-100, 115-120): the pooled text
    embedding [1, 1, D] (the tiny text encoder has no attention-mask setting: attention_mask None)."""
    text_inputs = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    prompt_embeds = text_encoder(text_inputs.input_ids, attention_mask=None)
    return prompt_embeds[1].unsqueeze(1)  # [1,768]->[1,1,768]


@torch.no_grad()
def official_demo(unet, vae, text_encoder, tokenizer, CLIP_V, plugin_dict, scb_dict, PromptTunner, image,
                  prompt, inference_step=20, image_resolution=512, seed=42):
    """demo.py `process` l.103-253 line by line, for the textbox prompt (hidden_state None) -> ([pred],
    selected keys). plugin_dict {task: RefTPB} and scb_dict {task: RefSCB} stand for pre-trained/<task>/tpb.pt
    and SCBNet.from_pretrained(pre-trained/<task>/scb); PromptTunner is a RefSelector (its forward takes the
    plugin embeddings first). Deviations, as official_restore: UniPC with final_sigmas_type="sigma_min", the
    12 SCB residuals with a zero mid residual, add_noise given t as [1], all on the CPU."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPImageProcessor
    noise_scheduler = UniPCMultistepScheduler.from_config(SD14_SCHEDULER, final_sigmas_type="sigma_min")
    clip_image_processor = CLIPImageProcessor()
    vae_image_processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
                                            do_convert_rgb=True, do_normalize=True)
    null_text_embeds = _encode_prompt(" ", tokenizer, text_encoder)
    # step-1: extract clip-t feats; step-2: extract clip-v feats (l.113-124)
    clip_t_feats = _encode_prompt(prompt, tokenizer, text_encoder)
    clip_input = clip_image_processor(images=image, return_tensors="pt").pixel_values
    clip_v_feats = CLIP_V(clip_input, output_attentions=True, output_hidden_states=True)
    # step-3: get the plugin embeds (l.126-139)
    plugin_gt_feats = {}
    plug_in_embeddings = torch.zeros(len(plugin_dict) + 1, 256, CTX)  # demo: 768, the context width
    for idx, key in enumerate(plugin_dict.keys()):
        plugin_dict[key].eval()
        plugin_gt_feats[key] = plugin_dict[key](clip_v_feats.hidden_states)  # TPBNet(clip_vision_outputs)
        plug_in_embeddings[idx] = plugin_gt_feats[key]
    plugin_gt_feats['null'] = null_text_embeds
    plug_in_embeddings[-1] = null_text_embeds
    # step-4: PromptTunner; step-5: the scores (l.141-148)
    prompt_embeds = PromptTunner(plug_in_embeddings, clip_t_feats)
    similarity_score = prompt_embeds[:, 0]
    similarity_score[similarity_score < 0] = 0
    if similarity_score.any() == 0:
        similarity_score[-1] = 1
    # get all plugin index larger than threshold (l.153-160)
    threshold = 0
    selected_index_list = torch.nonzero(similarity_score > threshold).squeeze().tolist()
    if not isinstance(selected_index_list, list):
        selected_index_list = [selected_index_list]
    selected_plugin_key_list = [list(plugin_gt_feats.keys())[i] for i in selected_index_list]
    selected_plugin_embeds_list = [plugin_gt_feats[i] for i in selected_plugin_key_list]
    image, new_width, new_height = demo_resize(image, image_resolution)  # l.166-173
    for index, plugin_key in enumerate(selected_plugin_key_list):  # l.177-251
        inp_of_unet_is_random_noise = plugin_key in ['lowlight', 'highlight']
        if plugin_key == 'null':
            pred = image
            continue
        else:
            prompt_embeds = selected_plugin_embeds_list[index]
            scb_net = scb_dict[plugin_key]
        image = vae_image_processor.preprocess(image, height=new_height, width=new_width)
        scb_cond = vae.config.scaling_factor * torch.chunk(vae.quant_conv(vae.encoder(image)), 2, dim=1)[0]
        b, c, h, w = scb_cond.size()
        generator = torch.Generator()
        generator.manual_seed(seed)
        if inp_of_unet_is_random_noise:
            latents = torch.randn((1, 4, h, w), generator=generator)
        else:
            noise = torch.randn((1, 4, h, w), generator=generator)
        if index != 0:
            inference_step = 3
        noise_scheduler.set_timesteps(inference_step)
        timesteps = noise_scheduler.timesteps
        timesteps = timesteps.long()
        for i, t in enumerate(timesteps):
            if t >= 960 and not inp_of_unet_is_random_noise:
                latents = noise_scheduler.add_noise(scb_cond, noise, t.reshape(1))
            down_block_res_samples = scb_net(latents, t, encoder_hidden_states=prompt_embeds,
                                             cond_img=scb_cond)
            noise_pred = unet(latents, t, encoder_hidden_states=prompt_embeds,
                              down_block_additional_residuals=down_block_res_samples,
                              mid_block_additional_residual=torch.zeros(1)).sample
            latents = noise_scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        pred = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        pred = vae_image_processor.postprocess(pred, output_type='pil')[0]
        if index != len(selected_plugin_key_list) - 1:
            image = pred.copy()  # this is used for the next plugin iteration
    return [pred], selected_plugin_key_list
