import collapse_sim as cs; cs.enable_x64()
import numpy as np, time, jax, jax.numpy as jnp
from collapse_sim.backends.emulated.ops import Emulator
from collapse_sim.rounding import round_to
e = Emulator("storage=bf16,compute=fp32,accumulate=fp32,operands=mx(e4m3fn,32)")
x = jnp.ones((12, 8))
for name, f in [("operand", lambda x: e.operand(x)), ("round_to", lambda x: round_to(x, e.compute, e.mode)),
                ("mul", lambda x: e.mul(x, x)), ("mx_values", lambda x: __import__('collapse_sim.mx', fromlist=['x']).mx_values(x, e.operands, -1))]:
    t = time.time(); c = jax.jit(f).lower(x).compile(); print(name, time.time() - t, len(jax.jit(f).lower(x).as_text()))
