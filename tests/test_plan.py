"""`unclip plan`: compile the sharded train step for a TPU topology on this CPU host.

The compile tests need libtpu (`pip install 'jax[tpu]==0.10.2'`, the `tpu` extra) and are skipped
without it; the topology parsing, analytic estimate, CLI and launch-script tests run anywhere.
"""
import os
import shlex
import subprocess

import jax
import pytest

from unclip_jax.parallel import plan as plan_lib
from unclip_jax.parallel.plan import GiB, parse_mesh, parse_topology, plan, plan_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny.py")
KARLO = os.path.join(ROOT, "experiments", "karlo.py")
PAPER = os.path.join(ROOT, "experiments", "paper.py")

needs_libtpu = pytest.mark.skipif(not plan_lib.libtpu_available(),
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


# ---------------------------------------------------------------------------- topologies


@pytest.mark.parametrize("name,chip,shape", [
    ("v5p:4x4x4", "v5p", (4, 4, 4)),
    ("v5p-128", "v5p", (4, 4, 4)),     # 128 TensorCores = 64 chips
    ("v4-32", "v4", (2, 2, 4)),
    ("v4-8", "v4", (2, 2, 1)),
    ("v4:2x2x4", "v4", (2, 2, 4)),
    ("v5litepod-16", "v5e", (4, 4)),
    ("v5e:2x2", "v5e", (2, 2)),
    ("v6e-8", "v6e", (2, 4)),
    ("v5p-256", "v5p", (4, 4, 8)),
])
def test_parse_topology(name, chip, shape):
    t = parse_topology(name)
    assert t.chip.name == chip and t.shape == shape
    assert parse_topology(t.name) == t
    assert parse_topology(t.accelerator_type) == t


@pytest.mark.parametrize("bad", ["v9:2x2", "v5p:4x4", "v4-6", "v5p-96", "nonsense"])
def test_parse_topology_rejects(bad):
    with pytest.raises(ValueError):
        parse_topology(bad)


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=8,tensor=1") == {"data": 2, "fsdp": 8, "tensor": 1}
    assert parse_mesh("fsdp=-1") == {"fsdp": -1}
    with pytest.raises(ValueError):
        parse_mesh("model=2")


# ---------------------------------------------------------------------------- compiled plan


@pytest.fixture(scope="module")
def tiny_report():
    if not plan_lib.libtpu_available():
        pytest.skip("libtpu not installed")
    return plan(TINY, "decoder", "v5e:2x2", mesh="data=1,fsdp=4,tensor=1", batch_size=8,
                dtype="bfloat16", compile_sample=False)


@needs_libtpu
def test_tiny_decoder_train_step_compiles_for_v5e(tiny_report):
    r = tiny_report
    assert r.num_devices == 4 and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r.train is not None and r.train.compiled, r.train and r.train.error
    assert r.fits and not r.estimated
    c = r.train
    assert c.flops_per_device > 0
    assert r.flops_per_step_total == pytest.approx(4 * c.flops_per_device)
    assert 0 < r.ideal_step_seconds() < 1
    # HBM accounting: peak = args + out - aliased (donated state) + temp + code.
    assert c.peak_bytes == (c.argument_bytes + c.output_bytes - c.alias_bytes + c.temp_bytes
                            + c.code_bytes)
    assert c.alias_bytes > 0  # the state is donated
    assert c.argument_bytes >= r.state_bytes_per_device
    assert c.peak_bytes < r.hbm_bytes == 16 * GiB
    # fsdp=4: each device holds ~1/4 of the params (norm scales / biases stay replicated).
    assert r.param_bytes_total == 4 * r.param_count
    assert r.param_bytes_per_device == pytest.approx(r.param_bytes_total / 4, rel=0.1)
    sharded = r.param_bytes_total - r.replicated_param_bytes
    assert r.param_bytes_per_device - r.replicated_param_bytes == pytest.approx(
        sharded / 4, rel=0.1)
    text = r.to_text()
    assert "FITS" in text and "v5e:2x2" in text
    assert "| yes |" in r.markdown_row()
    # Compiling for the topology leaves this process on its 8 CPU devices.
    assert jax.default_backend() == "cpu"
    assert len(jax.devices()) == 8


@needs_libtpu
def test_topology_devices_are_compile_only_tpus():
    devs = plan_lib.topology_devices("v4-32")
    assert len(devs) == 16  # megacore: one device per chip, as on a real v4-32
    assert all(d.platform == "tpu" for d in devs)
    assert jax.default_backend() == "cpu"


# ---------------------------------------------------------------------------- analytic path


def test_paper_decoder_does_not_fit_one_v5e_chip():
    r = plan(PAPER, "decoder", "v5e:1x1", batch_size=1, compile_train=False,
             compile_sample=False)
    assert r.mesh == {"data": 1, "fsdp": 1, "tensor": 1}  # train.mesh (fsdp=16) cannot apply
    assert "train.mesh does not fit" in r.note
    assert r.param_count > 3e9
    # Params + AdamW + EMA alone (16 bytes per param) exceed 16 GiB.
    assert r.state_bytes_per_device >= 16 * r.param_count * 0.99
    assert r.estimate_bytes > r.hbm_bytes
    assert not r.fits and r.estimated
    assert r.suggestion and "chips" in r.suggestion and "estimate" in r.suggestion
    assert "DOES NOT FIT" in r.to_text()


def test_suggestion_moves_data_parallelism_to_fsdp():
    # Karlo decoder (893M) on 4 v5e chips, pure data parallel: 4 x 3.3 GiB state + grads
    # per chip > 16 GiB; sharding it over fsdp=4 fits (analytic).
    r = plan(KARLO, "decoder", "v5e:2x2", mesh="data=4,fsdp=1,tensor=1", batch_size=4,
             compile_train=False, compile_sample=False)
    assert not r.fits
    assert r.param_bytes_per_device == r.param_bytes_total
    assert "fsdp=4" in r.suggestion or "fsdp=2" in r.suggestion
    r2 = plan(KARLO, "decoder", "v5e:2x2", mesh="data=1,fsdp=4,tensor=1", batch_size=4,
              compile_train=False, compile_sample=False)
    assert r2.fits  # lower bound only
    assert r2.param_bytes_per_device == pytest.approx(r2.param_bytes_total / 4, rel=0.01)


def test_refusal_naming_only_temporaries_gives_a_batch_that_fits(monkeypatch):
    """libtpu may refuse with "memory required for HLO temporaries (X) exceeds available HBM"
    (seen compiling the paper decoder for v4-32 at 8 images per chip): the report counts those
    temporaries, and the suggestion is a smaller batch, not the mesh that just failed."""
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (42.42G) exceeds available HBM (30.75G).")

    def refuse():
        raise RuntimeError(msg)

    monkeypatch.setattr(plan_lib, "_compile_train",
                        lambda spec, mesh, dtype: plan_lib._cost_of(refuse, "train"))
    r = plan(PAPER, "decoder", "v4:2x2x4", mesh="data=1,fsdp=16,tensor=1", batch_size=128,
             compile_sample=False)
    assert not r.fits and not r.train.compiled
    assert r.train.temp_bytes == int(42.42 * GiB)
    assert r.train.peak_bytes == (r.train.temp_bytes + r.state_bytes_per_device
                                  + r.batch_bytes_per_device)
    assert "per-device batch unchanged" not in r.suggestion
    per_device = int(r.suggestion.split("global batch <= ")[1].split()[0]) // 16
    assert 1 <= per_device < 8, r.suggestion  # 8 per chip did not fit
    assert "NOT COMPILED (needs " in r.to_text()


def test_plan_main_estimate_only(capsys):
    rc = plan_main(["--config", TINY, "--stage", "prior", "--topology", "v5p:2x2x1",
                    "--estimate-only", "--batch", "8", "--markdown"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "tiny / prior on v5p:2x2x1" in out and "MAY FIT (lower bound only" in out
    assert "| tiny prior |" in out and "lower bound fits" in out


def test_plan_main_usage_error(capsys):
    rc = plan_main(["--config", TINY, "--stage", "decoder", "--topology", "v7:2x2",
                    "--estimate-only"])
    assert rc == 2
    assert "unknown TPU" in capsys.readouterr().err


@pytest.mark.parametrize("path", [KARLO, PAPER])
def test_big_configs_build(path):
    from unclip_jax import config as cfg
    from unclip_jax.train.loop import train_config

    c = cfg.load_config_file(path)
    assert c.dtype == "bfloat16"
    assert cfg.clip_config(c).projection_dim in (768, 1024)
    assert cfg.prior_config(c).width == 2048
    dec = cfg.decoder_config(c)
    srs = cfg.sr_configs(c)
    assert dec.image_size == 64 and len(srs) == 2 and srs[0].image_size == 256
    assert set(c.diffusion.keys()) == {"prior", "decoder", "sr"}
    n = parse_topology(c.tpu.topology).num_chips
    for stage in ("prior", "decoder", "sr", "inpaint"):
        tc = train_config(c, stage)  # the trainer accepts the section
        assert tc.batch_size > 0 and tc.ema_decay == 0.9999
        sizes = plan_lib.resolve_mesh(tc.mesh, n)  # and its mesh fits tpu.topology
        assert tc.batch_size % (sizes["data"] * sizes["fsdp"]) == 0


# ---------------------------------------------------------------------------- launch_tpu.sh


def test_launch_tpu_dry_run():
    script = os.path.join(ROOT, "launch_tpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = subprocess.run(
        ["bash", script, "--name", "unclip-pod", "--zone", "us-east5-a",
         "--accelerator-type", "v5p-128", "--project", "proj", "--config",
         "experiments/karlo.py", "--stage", "decoder", "--workdir", "gs://bucket/karlo",
         "--dry-run"],
        capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("gcloud")]
    assert any("tpu-vm create unclip-pod" in ln and "--accelerator-type v5p-128" in ln
               for ln in lines)
    assert any("tpu-vm scp" in ln and "--worker=all" in ln for ln in lines)
    assert any("pip install -e" in ln and "[tpu]" in ln and "--worker=all" in ln
               for ln in lines)
    train = [ln for ln in lines if "unclip train" in ln]
    assert len(train) == 1 and "--worker=all" in train[0]
    assert ("unclip train decoder --config experiments/karlo.py --workdir gs://bucket/karlo"
            in train[0])


def test_launch_tpu_rejects_missing_flags():
    script = os.path.join(ROOT, "launch_tpu.sh")
    r = subprocess.run(["bash", script, "--name", "x", "--dry-run"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "missing" in r.stderr


def _launch_dry_run(*extra):
    script = os.path.join(ROOT, "launch_tpu.sh")
    out = subprocess.run(
        ["bash", script, "--name", "pod", "--zone", "z", "--accelerator-type", "v4-32",
         "--config", "experiments/karlo.py", "--stage", "prior", "--workdir", "gs://b/w",
         "--dry-run", *extra],
        capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if ln.startswith("gcloud") and "unclip train" in ln]


@pytest.mark.parametrize("endpoints, expected", [("10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4", "1"),
                                                 ("10.0.0.1", ""), (None, "")])
def test_launch_tpu_workers_form_one_jax_job_on_a_multi_worker_slice(tmp_path, endpoints,
                                                                     expected):
    """The remote training command sets UNCLIP_DISTRIBUTED=1 exactly when the GCE metadata lists
    several workers (a stub `curl` stands in for the metadata server; None = it fails)."""
    (line,) = _launch_dry_run()
    remote = shlex.split(line)[-1]  # the --command string, as the worker's shell gets it
    prelude, train = remote.split(" && unclip train ")
    assert train.startswith("prior --config experiments/karlo.py --workdir gs://b/w")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "curl"
    stub.write_text("#!/bin/sh\n" + (f"printf '%s' '{endpoints}'\n" if endpoints else "exit 22\n"))
    stub.chmod(0o755)
    (tmp_path / "unclip_jax").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "UNCLIP_DISTRIBUTED"}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    r = subprocess.run(["bash", "-c", prelude + ' && printf "DIST=%s" "${UNCLIP_DISTRIBUTED:-}"'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"DIST={expected}"
    n = len(endpoints.split(",")) if endpoints else 0
    assert f"{n} worker(s) in the slice metadata" in r.stdout
    # a missing code folder stops the chain: the training command never runs elsewhere
    r = subprocess.run(["bash", "-c", prelude + ' && echo TRAINING'], cwd=bindir, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "TRAINING" not in r.stdout


def test_launch_tpu_detach_runs_training_under_nohup_with_a_log():
    (line,) = _launch_dry_run("--detach", "--", "--data", "tfds:my_set@gs://b/tfds")
    remote = shlex.split(line)[-1]
    assert "nohup unclip train prior" in remote
    assert "--data tfds:my_set@gs://b/tfds > train-prior.log 2>&1 < /dev/null &" in remote


def test_launch_tpu_git_checkout_and_runtime_version():
    script = os.path.join(ROOT, "launch_tpu.sh")
    out = subprocess.run(
        ["bash", script, "--name", "pod", "--zone", "z", "--accelerator-type", "v5p-128",
         "--config", "experiments/karlo.py", "--stage", "sr", "--workdir", "gs://b/w",
         "--git", "https://example.com/unclip_jax.git", "--branch", "dev",
         "--runtime-version", "my-runtime", "--dry-run"],
        capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("gcloud")]
    assert any("tpu-vm create" in ln and "--version my-runtime" in ln for ln in lines)
    fetch = [ln for ln in lines if "git clone" in ln]
    assert len(fetch) == 1 and "--worker=all" in fetch[0]
    assert "git clone --branch dev https://example.com/unclip_jax.git unclip_jax" in fetch[0]
    assert "pull --ff-only origin dev" in fetch[0]
    assert not any("tpu-vm scp" in ln for ln in lines)  # no tarball when the code comes by git
    r = subprocess.run(["bash", script, "--name", "p", "--zone", "z", "--accelerator-type",
                        "v9-8", "--config", "experiments/karlo.py", "--stage", "sr",
                        "--workdir", "w", "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "--runtime-version" in r.stderr


@needs_libtpu
def test_sampling_loop_compiles_for_v5e_and_flops_are_per_step():
    """`unclip plan` compiles the whole sampling loop (a fori_loop of guided steps); the FLOPs it
    reports are one step's (the loop body, counted once), so they do not grow with the number of
    steps, while the text multiplies them by the steps for the loop's ideal time."""
    from unclip_jax import config as cfg

    reports = {}
    for steps in ("10", "20"):
        c = cfg.load_config_file(TINY)
        c.diffusion.prior["sample_steps"] = steps
        reports[steps] = plan(c, "prior", "v5e:2x2", mesh="data=1,fsdp=4,tensor=1",
                              batch_size=8, compile_train=False, compile_sample=True)
    r10, r20 = reports["10"], reports["20"]
    assert r10.sample.compiled and r10.sample.flops_per_device > 0
    assert r10.sample_steps == 10 and r20.sample_steps == 20
    assert abs(r20.sample.flops_per_device - r10.sample.flops_per_device) <= (
        1e-3 * r10.sample.flops_per_device)
    assert "sampling (10 steps" in r10.to_text() and "sampling (20 steps" in r20.to_text()
