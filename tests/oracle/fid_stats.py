"""Oracle for tests/test_metrics.py: clean-fid's and pytorch-fid's FID/KID functions on saved feature arrays.

Run in the oracle environment: python fid_stats.py FEATS.npz OUT.json
FEATS.npz holds pairs a<i>, b<i>; for each pair it writes clean-fid frechet_distance on (mu, sigma) computed
as clean-fid's fid_from_feats does, pytorch-fid calculate_frechet_distance on the same, and clean-fid
kernel_distance after np.random.seed(i) (clean-fid draws its subsets from numpy's global RNG).
"""
import json
import sys

import numpy as np
from cleanfid import fid as cf
from pytorch_fid import fid_score as pf

z = np.load(sys.argv[1])
out = []
for i in range(len(z.files) // 2):
    a, b = z[f"a{i}"], z[f"b{i}"]
    mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    np.random.seed(i)
    out.append({"cleanfid_fid": float(cf.frechet_distance(mu1, s1, mu2, s2)),
                "cleanfid_fid_from_feats": float(cf.fid_from_feats(a, b)),
                "pytorch_fid": float(pf.calculate_frechet_distance(mu1, s1, mu2, s2)),
                "cleanfid_kid": float(cf.kernel_distance(a, b))})
json.dump(out, open(sys.argv[2], "w"))
