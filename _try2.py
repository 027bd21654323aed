import collapse_sim as cs; cs.enable_x64()
import numpy as np, time, sys
from collapse_sim.backends import make_backend
from collapse_sim.model import ModelConfig, forward, init_params
P = init_params(ModelConfig(d=8, n_layers=2, vocab=4, seed=3, pe="rope", d_ff=16, out_proj=True))
toks = np.random.default_rng(12).integers(0, 4, 12); probe = np.roll(toks, -1)
for pol in sys.argv[1:]:
    e = make_backend("emulated", pol)
    t=time.time(); ye, ype = forward(P, toks, e, probe=probe); print(pol, "emu", time.time()-t)
