"""Bulk generation (fastdiff.bulk) on the CPU with gloo: rank-independent files, resume
after SIGKILL, atomic writes, and errors that name the rank or the path.

A tiny class-conditional U-Net with fixed random weights (x0-prediction, so samples stay
O(0.1)) is saved once per session and run through the real CLI (`fastdiff sample --outdir`).
"""
import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import bulk, cli, distributed, output_files

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from fastdiff.models import UNet, UNetConfig, save_model

    cfg = UNetConfig(image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=(), head_channels=8, num_groups=4, num_classes=3)
    model = UNet(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    meta = {"image_shape": [1, 8, 8], "num_classes": 3, "null_class": 3, "data_range": [-1.0, 1.0],
            "prediction": "sample", "schedule": {"name": "linear", "num_train_timesteps": 1000}}
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", meta)


def cli_args(model: Path, outdir: Path, seeds: str = "0-11", *extra: str) -> list[str]:
    # --device cpu: these are the gloo, process-level tests, GPU or not (a 1-GPU machine
    # would otherwise give rank 1 cuda:1)
    return ["sample", "--model", str(model), "--seeds", seeds, "--outdir", str(outdir), "--steps", "3",
            "--format", "npy", "--no-progress", "--device", "cpu", *extra]


def script(tmp_path: Path, body: str) -> Path:
    """A driver that patches fastdiff.bulk (slow or failing model) and runs the CLI."""
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent("""
        import os, sys, time
        from fastdiff import bulk, cli, sample_cmd
        load = sample_cmd.load_diffusion_model

        def patched_load(name, device):
            loaded = load(name, device)
            forward = loaded.model.forward

            def hooked(*args, **kwargs):
        {body}
                return forward(*args, **kwargs)

            loaded.model.forward = hooked
            return loaded

        if __name__ == "__main__":
            sample_cmd.load_diffusion_model = patched_load
            sys.exit(cli.main(sys.argv[1:]))
    """).replace("{body}", textwrap.indent(textwrap.dedent(body).strip(), " " * 8)))
    return path


def files(d: Path) -> dict[str, bytes]:
    """The samples and any temporaries; not the run's lock and settings record."""
    from fastdiff.output_files import LOCK_NAME, RUN_NAME

    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name not in (LOCK_NAME, RUN_NAME)}


# ---- world size ---------------------------------------------------------------------
@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
def test_one_and_two_ranks_give_the_same_samples(tiny_model, tmp_path, capfd, launcher):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(cli_args(tiny_model, one, "0-10,7", "--batch", "4", "--guidance-scale", "2")) == 0
    assert "11 samples" in capfd.readouterr().out
    npz = tmp_path / "all.npz"
    args = cli_args(tiny_model, two, "0-10,7", "--batch", "3", "--guidance-scale", "2", "--npz", str(npz))
    if launcher == "torchrun":
        args[args.index("--no-progress")] = "--progress"  # stderr is a pipe here
        r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "fastdiff", *args], env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout
        assert "11/11" in r.stderr  # rank 0's bar counts both ranks' samples (all-reduced)
    else:
        assert cli.main([*args, "--nproc", "2"]) == 0
        out = capfd.readouterr().out
    assert "rank 0:" in out and "rank 1:" in out and "11 new" in out
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b) == [f"{s:06d}.npy" for s in range(11)]
    for name in a:
        np.testing.assert_allclose(np.load(two / name), np.load(one / name), rtol=0, atol=1e-6, err_msg=name)
    with np.load(npz) as z:
        assert z["arr_0"].shape == (11, 1, 8, 8) and z["arr_0"].dtype == np.float32
        np.testing.assert_array_equal(z["seeds"], np.arange(11))
        np.testing.assert_array_equal(z["labels"], np.arange(11) % 3)
        np.testing.assert_array_equal(z["arr_0"][5], np.load(two / "000005.npy"))


def test_png_classes_and_npz(tiny_model, tmp_path, capsys):
    raw, png = tmp_path / "raw", tmp_path / "png"
    opts = ("--classes", "2,0", "--guidance-scale", "1.5")
    assert cli.main(cli_args(tiny_model, raw, "3-7", *opts)) == 0
    args = cli_args(tiny_model, png, "3-7", *opts, "--npz", str(tmp_path / "png.npz"))
    args[args.index("npy")] = "png"
    assert cli.main(args) == 0
    from PIL import Image

    for s in range(3, 8):
        with Image.open(png / f"{s:06d}.png") as im:
            assert im.mode == "L" and im.size == (8, 8)
            got = np.asarray(im)
        want = bulk.to_uint8(torch.from_numpy(np.load(raw / f"{s:06d}.npy"))[None], (-1.0, 1.0))[0, ..., 0]
        np.testing.assert_array_equal(got, want)
    with np.load(tmp_path / "png.npz") as z:
        assert z["arr_0"].shape == (5, 8, 8, 1) and z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["labels"], [0, 2, 0, 2, 0])  # classes[s % 2]
    # the label reaches the model: a different class list gives different samples
    assert cli.main(cli_args(tiny_model, tmp_path / "other", "3-7", "--classes", "1", "--guidance-scale", "1.5")) == 0
    assert not np.array_equal(np.load(tmp_path / "other" / "000003.npy"), np.load(raw / "000003.npy"))


# ---- crash and resume ---------------------------------------------------------------
@pytest.fixture
def one_thread():
    """The driver subprocesses run with OMP_NUM_THREADS=1; CPU convolutions round differently
    with other thread counts, so byte-identical comparisons run in-process on one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigkill_then_rerun_completes_identically(tiny_model, tmp_path, capsys, one_thread):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli.main(cli_args(tiny_model, ref, "0-15", "--batch", "2")) == 0
    driver = script(tmp_path, "time.sleep(0.05)")  # 3 evals per batch: ~0.15 s per batch
    proc = subprocess.Popen([PY, str(driver), *cli_args(tiny_model, out, "0-15", "--batch", "2")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.is_dir() and len(list(out.glob("*.npy"))) >= 4):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the driver wrote no files in 60 s"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = len(list(out.glob("*.npy")))
    assert 4 <= done < 16
    (out / f"{output_files.TMP_PREFIX}000009.npy.x{output_files.TMP_SUFFIX}").write_bytes(b"half a file")  # as if killed mid-write
    capsys.readouterr()
    assert cli.main(cli_args(tiny_model, out, "0-15", "--batch", "2")) == 0
    assert f"{16 - done} new, {done} already there" in capsys.readouterr().out
    assert files(out) == files(ref)  # complete, byte-identical, no temporaries left


# ---- failures -----------------------------------------------------------------------
def _fail_on_rank_1(how: str) -> None:
    with distributed.distributed("cpu") as (ranks, _):
        if ranks.rank == 1:
            if how == "exit":
                os._exit(3)
            raise RuntimeError("injected failure")
        ranks.barrier()  # rank 0 waits on the dead rank until launch terminates it


@pytest.mark.parametrize("how, detail", [("exit", "exited with code 3"), ("raise", "RuntimeError: injected failure")])
def test_spawn_names_the_failed_rank(how, detail):
    with pytest.raises(distributed.RankFailedError, match=f"rank 1 failed: {detail}") as e:
        distributed.launch(2, _fail_on_rank_1, how)
    assert e.value.rank == 1


def test_torchrun_names_the_failed_rank(tiny_model, tmp_path):
    driver = script(tmp_path, """
        if os.environ["RANK"] == "1":
            os._exit(7)
    """)
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
                        *cli_args(tiny_model, tmp_path / "out")], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in r.stderr and "exitcode  : 7" in r.stderr, r.stderr[-3000:]


def test_disk_full_names_the_path(tiny_model, tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up at the first sample (the small run record still fit)
        if ".npy" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert cli.main(cli_args(tiny_model, tmp_path, "0-3")) == 1
    err = capsys.readouterr().err
    assert f"fastdiff: error: cannot write {tmp_path / '000000.npy'}: [Errno 28] No space left on device" in err
    assert files(tmp_path) == {}  # no partial file, no temporary


def test_permission_denied_names_the_path(tiny_model, tmp_path, monkeypatch, capsys):
    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)  # chmod does not stop root
    assert cli.main(cli_args(tiny_model, tmp_path, "5")) == 1
    # the first file a run writes is its settings record
    assert f"cannot write {tmp_path / '.fastdiff-run.json'}: [Errno 13] Permission denied" in capsys.readouterr().err


def test_outdir_under_a_file_names_the_path(tiny_model, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(cli_args(tiny_model, tmp_path / "file" / "out", "0")) == 1
    assert f"fastdiff: error: cannot create {tmp_path / 'file' / 'out'}: [Errno 20]" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("", "empty seed range"), ("5-3", "empty range '5-3'"),
                                           ("1,x", "malformed part 'x'"), ("-4", "malformed part '-4'")])
def test_bad_seed_range_is_a_usage_error(tiny_model, tmp_path, capsys, text, message):
    assert cli.main(cli_args(tiny_model, tmp_path / "out", text)) == 2
    assert f"fastdiff: error: seeds: {message}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_clear_errors(tiny_model, tmp_path, capsys):
    assert cli.main(cli_args(tiny_model, tmp_path / "a", "0", "--classes", "3")) == 2
    assert "--classes: [3] out of range" in capsys.readouterr().err
    args = cli_args(tiny_model, tmp_path / "a", "0")
    del args[args.index("--seeds"):args.index("--seeds") + 2]
    assert cli.main(args) == 2
    assert "bulk mode (--outdir) needs --seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no seeds"):
        bulk.generate(None, [], tmp_path, sample_shape=(1, 8, 8))


def fake_gpus(monkeypatch, n):
    """torch.cuda reporting n GPUs; set_device records instead of selecting."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_an_explicit_gpu_index_with_several_ranks_and_gpus_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda:0 would put all 2 ranks on one of the 2 GPUs; "
                                         "use --device cuda"):
        with distributed.distributed("cuda:0"):
            pass


@pytest.mark.parametrize("gpus, local_rank, want", [(4, 3, "cuda:3"), (1, 3, "cuda:0"), (2, 3, "cuda:1")])
def test_each_rank_takes_local_rank_modulo_the_gpus_it_sees(monkeypatch, gpus, local_rank, want):
    """One GPU per rank under per-rank CUDA_VISIBLE_DEVICES (SLURM --gpus-per-task=1): cuda:0."""
    chosen = fake_gpus(monkeypatch, gpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with distributed.distributed("cuda") as (_, device):
        assert device == torch.device(want) and chosen == [device]


def test_more_ranks_than_gpus_join_over_gloo(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: both ranks sample on cuda:0, so the
    collectives must not be NCCL's (it aborts with "Duplicate GPU detected")."""
    fake_gpus(monkeypatch, 1)
    backends = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: backends.append(backend))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        with distributed.distributed("cuda") as (_, device):
            assert device == torch.device("cuda:0")
    assert backends == ["gloo", "gloo"]


# ---- concurrency ----------------------------------------------------------------------
def test_two_runs_into_one_folder_share_the_work(tiny_model, tmp_path):
    """Two processes started together into one folder: the second waits on the folder's lock,
    then finds every file there; neither dies, neither's temporaries are touched by the other."""
    out = tmp_path / "out"
    driver = script(tmp_path, "time.sleep(0.05)")  # ~0.6 s of sampling per run
    go = tmp_path / "go"
    starter = tmp_path / "start.py"  # both processes reach cli.main at the same moment
    starter.write_text(textwrap.dedent(f"""
        import os, runpy, sys, time
        from pathlib import Path
        Path(sys.argv[1]).touch()
        while not Path({str(go)!r}).exists():
            time.sleep(0.005)
        sys.argv = [{str(driver)!r}, *sys.argv[2:]]
        runpy.run_path({str(driver)!r}, run_name="__main__")
    """))
    procs = [subprocess.Popen([PY, str(starter), str(tmp_path / f"ready{i}"),
                               *cli_args(tiny_model, out, "0-7", "--batch", "2")],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    news = sorted(int(r[0].split(" new,")[0].rsplit("(", 1)[1]) for r in results)
    assert news == [0, 8]  # one run did all the work, the other found it done
    assert sum("another run is writing into" in r[1] for r in results) == 1
    assert sorted(files(out)) == [f"{s:06d}.npy" for s in range(8)]


def test_local_ranks_on_the_cpu_split_the_cores(tiny_model, tmp_path, monkeypatch, capsys):
    """--nproc N on the CPU: each rank takes cores // N threads (N ranks x all cores would
    oversubscribe), unless OMP_NUM_THREADS says otherwise."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli.main(cli_args(tiny_model, tmp_path / "a", "0")) == 0
    assert calls == [2]  # 8 cores // 3 ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main(cli_args(tiny_model, tmp_path / "b", "0")) == 0
    assert calls == [2]
