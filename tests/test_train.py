"""Trainer behaviour: meshes, two processes, resume, SIGKILL, NaN stop, config overrides."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sd3_jax.sharding.mesh import MeshConfig
from sd3_jax.train.config import TrainConfig, apply_overrides, load_config
from sd3_jax.train.data import make_source
from sd3_jax.train.loop import TrainingDiverged, train
from sd3_jax.train.report import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")


def smoke(*overrides: str) -> TrainConfig:
    return apply_overrides(load_config(SMOKE), list(overrides))


def losses(workdir: str) -> list[float]:
    return [m["loss"] for m in read_metrics(workdir) if "loss" in m]


def steps(workdir: str) -> list[int]:
    return [m["step"] for m in read_metrics(workdir) if "loss" in m]


def train_cmd(workdir: str, *overrides: str) -> list[str]:
    """`sd3-jax train` on the smoke config with `--set` overrides."""
    cmd = [
        sys.executable,
        "-m",
        "sd3_jax.cli",
        "train",
        "--config",
        SMOKE,
        "--workdir",
        workdir,
        "--no-progress",
    ]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", **extra)
    e.pop("XLA_FLAGS", None)
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[float]:
    """Losses of 8 uninterrupted smoke steps (checkpoint every 2)."""
    wd = str(tmp_path_factory.mktemp("straight"))
    train(smoke("steps=8", "checkpoint_every=2", "eval_every=4"), wd, progress=False)
    assert steps(wd) == list(range(1, 9))
    return losses(wd)


def test_resume_equals_straight_run(tmp_path, straight):
    """8 steps straight == 4 steps, stop, then 4 more in the same workdir, loss for loss."""
    wd = str(tmp_path)
    train(smoke("steps=4", "checkpoint_every=2", "eval_every=4"), wd, progress=False)
    train(smoke("steps=8", "checkpoint_every=2", "eval_every=4"), wd, progress=False)
    assert steps(wd) == list(range(1, 9))
    np.testing.assert_array_equal(losses(wd), straight)  # bit for bit
    evals = [m for m in read_metrics(wd) if m.get("kind") == "eval"]
    assert [m["step"] for m in evals] == [4, 8] and all(np.isfinite(m["val_loss"]) for m in evals)


def test_sigkill_then_resume(tmp_path, straight):
    """SIGKILL mid-run; the restart resumes from the last complete checkpoint and matches the straight run."""
    wd = str(tmp_path / "wd")
    cmd = train_cmd(wd, "steps=8", "checkpoint_every=2", "eval_every=4", "async_checkpoints=false")
    slow = cmd + ["--set", "steps=400"]  # long enough to be killed mid-run
    proc = subprocess.Popen(slow, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = os.path.join(wd, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [d for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        if len(done) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import orbax.checkpoint as ocp

    latest = ocp.CheckpointManager(os.path.abspath(ckpts)).latest_step()
    assert latest is not None and latest >= 2
    subprocess.run(cmd, cwd=ROOT, env=env(), check=True, capture_output=True)
    # steps=400 shares the constant schedule with steps=8, so the first 8 losses must agree.
    assert steps(wd) == list(range(1, 9))
    np.testing.assert_array_equal(losses(wd), straight)  # bit for bit


def _wait_for_checkpoints(proc, ckpts: str, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [d for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        if len(done) >= n:
            return
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"no {n} checkpoints in {timeout} s")


def test_sigterm_saves_the_current_step_and_resumes_exactly(tmp_path, straight):
    """SIGTERM (a pod scheduler's stop) checkpoints the step in flight, exits 143 with one line, and the
    same command resumes from that step and matches the straight run."""
    wd = str(tmp_path / "wd")
    # checkpoints every 1000 steps: any checkpoint below 1000 is the one SIGTERM wrote
    cmd = train_cmd(wd, "steps=400", "checkpoint_every=1000", "eval_every=4", "async_checkpoints=false")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    metrics = os.path.join(wd, "metrics.jsonl")
    while not (os.path.exists(metrics) and [m for m in read_metrics(wd) if m.get("step", 0) >= 3]):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    err = err.decode()
    assert proc.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "stopped by SIGTERM at step" in err, err
    import orbax.checkpoint as ocp

    saved = ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints"))).latest_step()
    assert saved is not None and 3 <= saved < 400 and f"at step {saved} " in err
    resume = train_cmd(wd, "steps=8", "checkpoint_every=1000", "eval_every=4", "async_checkpoints=false")
    if saved < 8:
        subprocess.run(resume, cwd=ROOT, env=env(), check=True, capture_output=True)
    got = {m["step"]: m["loss"] for m in read_metrics(wd) if "loss" in m}
    assert sorted(got)[:8] == list(range(1, 9))
    np.testing.assert_array_equal([got[i] for i in range(1, 9)], straight)  # bit for bit


def _file_size_limited(cmd: list[str], limit: int) -> list[str]:
    """`cmd` (a python command) run with files capped at `limit` bytes: a write past it fails with EFBIG
    (Python ignores SIGXFSZ), as writes fail with ENOSPC on a full disk."""
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))"
    run = "import runpy, sys; sys.argv[0] = 'sd3-jax'; runpy.run_module('sd3_jax.cli', run_name='__main__')"
    return [cmd[0], "-c", f"{cap}; {run}", *cmd[3:]]


def test_disk_full_while_checkpointing_stops_cleanly_and_resumes_exactly(tmp_path, straight):
    """A checkpoint write that fails (files capped at 24 KiB, which a checkpoint's data file exceeds and
    metrics.jsonl does not; asynchronous checkpoints, the default, so the failure surfaces a step later)
    stops training with one error line and exit 1 naming the checkpoint that failed and the last complete
    one; that checkpoint restores and the run resumes to the straight run's losses exactly."""
    wd = str(tmp_path / "wd")
    args = ("checkpoint_every=2", "eval_every=4", "async_checkpoints=true")
    train(smoke("steps=4", *args), wd, progress=False)
    capped = _file_size_limited(train_cmd(wd, "steps=8", *args), 24 << 10)
    full = subprocess.run(capped, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert full.returncode == 1, full.stderr[-3000:]
    err = full.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sd3-jax: error: could not write the checkpoint"), (
        err
    )
    assert "at step 6 (File too large, errno 27)" in err and "last complete checkpoint: step 4" in err, err
    import orbax.checkpoint as ocp

    ckpts = os.path.abspath(os.path.join(wd, "checkpoints"))
    assert ocp.CheckpointManager(ckpts).latest_step() == 4
    train(smoke("steps=8", *args), wd, progress=False)
    got = {m["step"]: m["loss"] for m in read_metrics(wd) if "loss" in m}
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_array_equal([got[i] for i in range(1, 9)], straight)


def test_second_run_on_a_live_workdir_is_refused(tmp_path):
    """A second `sd3-jax train` on a workdir a live run holds exits 2 naming the holder's pid; once the
    holder is killed (SIGKILL: no cleanup) the workdir is free again."""
    wd = str(tmp_path / "wd")
    cmd = train_cmd(wd, "steps=400", "checkpoint_every=2", "async_checkpoints=false")
    holder = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_checkpoints(holder, os.path.join(wd, "checkpoints"), 1)
    second = subprocess.run(train_cmd(wd, "steps=4"), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (
        f"sd3-jax: error: {wd} is in use by a running sd3-jax train (pid {holder.pid}); stop it or use "
        "another --workdir"
    )
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    again = subprocess.run(train_cmd(wd, "steps=2"), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_nan_stops_without_touching_last_good_checkpoint(tmp_path):
    wd = str(tmp_path)
    cfg = smoke(
        "steps=30",
        "checkpoint_every=1",
        "optim.lr=1e30",
        "optim.clip_norm=0",
        "optim.warmup_steps=0",
        "eval_every=0",
        "async_checkpoints=false",
    )
    with pytest.raises(
        TrainingDiverged, match=r"loss is (nan|inf|-inf) at step (\d+); stopped\. Last good checkpoint"
    ):
        train(cfg, wd, progress=False)
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints")))
    bad = [m["step"] for m in read_metrics(wd) if "loss" in m and not np.isfinite(m["loss"])]
    assert not bad  # the NaN step is reported, never logged as a loss
    last = mngr.latest_step()
    assert last is not None
    restored = mngr.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = jax.tree.leaves(restored.state["params"])
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_meshes_give_the_same_losses_and_shard_params(tmp_path):
    """1 device vs data=2 x fsdp=4 vs data=2 x tensor=4 on 8 virtual CPU devices."""
    out = tmp_path / "res.json"
    meshes = ["num_devices=1,fsdp=1", "data=2,fsdp=4", "data=2,fsdp=1,tensor=4"]
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_mesh_worker.py"), str(out), str(tmp_path), *meshes],
        cwd=ROOT,
        env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        check=True,
        capture_output=True,
    )
    res = json.loads(out.read_text())
    ref = np.array(res[meshes[0]]["losses"])
    assert len(ref) == 6 and res[meshes[0]]["n_devices"] == 1
    for m in meshes[1:]:
        np.testing.assert_allclose(res[m]["losses"], ref, rtol=1e-4, err_msg=m)
        assert res[m]["n_devices"] == 8
    fsdp = res["data=2,fsdp=4"]["shardings"]
    q = fsdp["['blocks_0']['attn']['to_q']['kernel']"]  # (layers, embed, heads, kv): embed -> fsdp
    assert q["spec"][:2] == [None, "fsdp"] and q["local"][1] * 4 == q["global"][1]
    tp = res["data=2,fsdp=1,tensor=4"]["shardings"]
    q = tp["['blocks_0']['attn']['to_q']['kernel']"]  # heads -> tensor
    assert q["spec"][2] == "tensor" and q["local"][2] * 4 == q["global"][2]
    fc1 = tp["['blocks_0']['ff']['fc1']['kernel']"]  # (layers, embed, mlp): mlp -> tensor
    assert fc1["spec"][2] == "tensor" and fc1["local"][2] * 4 == fc1["global"][2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, straight):
    """Two processes on 127.0.0.1 (gloo collectives), one CPU device each, fsdp=2: same losses as one."""
    wd = str(tmp_path / "wd")
    port = _free_port()
    cmd = train_cmd(wd, "steps=8", "checkpoint_every=2", "eval_every=4", "mesh.fsdp=2")
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                JAX_PLATFORMS="cpu",
            ),
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err.decode()[-3000:]
    assert steps(wd) == list(range(1, 9))
    np.testing.assert_allclose(losses(wd), straight, rtol=1e-4)


def test_overrides_and_mesh_sizes():
    cfg = smoke(
        "mesh.fsdp=4",
        "steps=200",
        "batch_size=8",
        "checkpoint_every=50",
        "optim.lr=3e-4",
        "eval_timesteps=0.2,0.4",
        "compute_dtype=bfloat16",
        "async_checkpoints=false",
    )
    assert (cfg.mesh.fsdp, cfg.steps, cfg.optim.lr, cfg.eval_timesteps) == (4, 200, 3e-4, (0.2, 0.4))
    assert cfg.async_checkpoints is False
    with pytest.raises(ValueError, match="has no field 'nope'"):
        smoke("optim.nope=1")
    with pytest.raises(ValueError, match="key=value"):
        smoke("steps")
    with pytest.raises(ValueError, match="formulation"):
        smoke("formulation=bogus")
    assert MeshConfig(data=2, fsdp=-1, tensor=2).sizes(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        MeshConfig(data=2, fsdp=3, tensor=1).sizes(8)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_grads(policy):
    """Rematerialisation changes memory, not math: same loss and gradients as no remat."""
    import dataclasses

    import jax.numpy as jnp

    from sd3_jax.train.state import init_params
    from sd3_jax.train.step import batch_loss

    cfg = smoke("compute_dtype=float32")
    src = make_source(cfg)
    batch = {k: jnp.asarray(np.stack([src[i][k] for i in range(4)])) for k in src[0]}
    params = init_params(cfg.model, jax.random.key(0))
    t = jnp.array([0.1, 0.4, 0.6, 0.9])
    noise = jax.random.normal(jax.random.key(1), batch["latents"].shape)

    def loss_grad(c):  # jitted: op by op, a scanned and rematerialised step takes a minute
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(batch_loss(c, p, batch, t, noise, None))))(
            params
        )

    ref_l, ref_g = loss_grad(cfg)
    l, g = loss_grad(dataclasses.replace(cfg, model=cfg.model.replace(remat=policy)))
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, ref_g)
