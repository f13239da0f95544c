"""A model dir saved on one machine loads on another whose devices differ (the shipped model is
saved on a CPU and loaded on GPUs / TPUs; a GPU-trained one is loaded on CPUs). orbax stores each
array's sharding; restoring it as stored fails where that device does not exist."""
import os
import subprocess
import sys

import jax
import numpy as np

from unclip_jax.pipelines import model as model_lib

HERE = os.path.dirname(__file__)
FIXTURE_MODEL = os.path.join(HERE, "fixtures", "micro_model")

CHILD = """
import sys, jax, numpy as np
from unclip_jax.pipelines import model as model_lib
assert jax.device_count() == 1, jax.devices()
m = model_lib.load(sys.argv[1])
leaf = jax.tree.leaves(m.params["decoder"])[0]
assert leaf.sharding.device_set == {jax.devices()[0]}
np.save(sys.argv[2], np.asarray(leaf))
"""


def test_model_saved_on_a_device_this_process_lacks_loads(tmp_path, devices):
    m = model_lib.load(FIXTURE_MODEL)
    m.params = jax.device_put(m.params, devices[7])  # stored shardings name device 7
    out = str(tmp_path / "model")
    model_lib.save(m, out)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    leaf_file = str(tmp_path / "leaf.npy")
    proc = subprocess.run([sys.executable, "-c", CHILD, out, leaf_file], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(leaf_file),
                                  np.asarray(jax.tree.leaves(m.params["decoder"])[0]))
