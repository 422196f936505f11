"""Errors as the user meets them: bad option values, I/O failures (read-only folder, full disk)
and third-party reader failures end in one line `lmkit: error: ...` from a real `lmkit`
process (the parser's refusals and `--debug` through the CLI's entry point in this process),
`--debug` shows the traceback, and nothing already saved is lost."""

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit.cli import main
from lmkit.errors import StorageError
from lmkit.train.distributed import DistEnv
from lmkit.train.optim import build_optimizer, build_scheduler
from lmkit.train.state import STATE, load_checkpoint, save_checkpoint


def lmkit_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkit.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a failed `lmkit` run (and nothing on stdout)."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmkit: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    return lines[0]


def small_model() -> lmkit.Model:
    return lmkit.Model(lmkit.preset("tiny-decoder", hidden_size=16, intermediate_size=32,
                                    num_heads=2, num_kv_heads=1, decoder_layers=1,
                                    vocab_size=64, max_positions=32))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("args,says", [
    (["pretrain", "--steps", "-5"], "argument --steps: steps must be at least 1, got -5"),
    (["pretrain", "--tokenizer", "bpe:10"], "a bpe vocabulary needs at least 257 tokens"),
    (["finetune", "ckpt", "--lr", "nan"], "lr must be a finite number"),
    (["generate", "ckpt", "--prompt", "a", "--max-new-tokens", "-1"],
     "max_new_tokens must be at least 1"),
    (["generate", "ckpt", "--prompt", "a", "--beams", "0"], "num_beams must be at least 1"),
    (["generate", "ckpt", "--prompt", "a", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "ckpt", "--prompt", "a", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_values_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.chdir(tmp_path)  # the CLI's entry point in this process: its parser refuses
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    line = one_line_error(subprocess.CompletedProcess(args, code, out.out, out.err))
    assert says in line and f"lmkit {args[0]} --help" in line
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_temperature_zero_means_greedy():
    model = small_model().eval()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = lmkit.generate(model, prompts, max_new_tokens=6)
    zero = lmkit.generate(model, prompts, max_new_tokens=6, do_sample=True, temperature=0.0,
                          seed=1)
    assert zero.sequences == greedy.sequences
    with pytest.raises(lmkit.ConfigError, match="top_k must be at least 1"):
        lmkit.generate(model, prompts, do_sample=True, top_k=0)


def test_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "ckpt"
    small_model().save(bad)
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {')  # truncated
    line = one_line_error(lmkit_cli("info", bad))
    assert f"{bad / 'tokenizer.json'} is not a readable tokenizer file" in line
    for args in (["--debug", "info", bad], ["info", bad, "--debug"]):  # both places parse
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1] == line


# ---- storage: read-only and full disks --------------------------------------------------------


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "2m"):
    """A tmpfs of `size` (as root), else a plain folder; yields (folder, real)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    real = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True).returncode == 0
    try:
        yield mnt, real
    finally:
        if real:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Write zeros under `folder` until its file system is full, then free `leave` bytes."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    size = (folder / "filler").stat().st_size
    os.truncate(folder / "filler", max(0, size - leave))


@pytest.fixture
def saved(tmp_path):
    """(a checkpoint to convert, a small disk, whether it is a real tmpfs, a checkpoint on
    it, that checkpoint's file digests)."""
    src = tmp_path / "src"
    small_model().save(src)
    with small_disk(tmp_path) as (disk, real):
        dst = disk / "ckpt"
        small_model().save(dst)
        yield src, disk, real, dst, digest(dst)


def test_read_only_folder_is_one_line_and_keeps_the_checkpoint(saved, monkeypatch):
    src, disk, real, dst, before = saved
    if real:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        line = one_line_error(lmkit_cli("convert", src, dst, "--to", "lmkit"))
        assert str(dst) in line and "read-only file system" in line
    else:  # not root: the OS error is mocked where the staging folder is made
        def refuse(self, *a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        monkeypatch.setattr(Path, "mkdir", refuse)
        with pytest.raises(StorageError, match="read-only file system"):
            lmkit.save(small_model(), dst)
        monkeypatch.undo()
    assert digest(dst) == before


def test_full_disk_is_one_line_and_keeps_the_checkpoints(saved, monkeypatch):
    src, disk, real, dst, before = saved
    # a training checkpoint (torch.save hides ENOSPC in a RuntimeError)
    model = small_model()
    opt = build_optimizer(model, lr=1e-3)
    sched = build_scheduler(opt, "constant", 0, 10)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    sched.step()  # a consistent state of step 1 (resume checks the scheduler's step)
    run = disk / "run"
    step1 = save_checkpoint(run, 1, model, opt, sched, None, DistEnv())
    state_before = digest(step1)
    if real:
        fill(disk)
        line = one_line_error(lmkit_cli("convert", src, dst, "--to", "lmkit"))
        assert str(dst) in line and "no space left on device" in line
        # room for the model files but not for trainer_state.pt (twice their size)
        fill(disk, leave=sum(p.stat().st_size for p in step1.iterdir() if p.name != STATE)
             + 3 * 4096)
    else:  # not root: the writer reports ENOSPC as torch.save does
        def no_space(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        monkeypatch.setattr("lmkit.train.state.torch.save", no_space)
        monkeypatch.setattr("lmkit.errors.os.statvfs", lambda p: os.statvfs_result(
            (4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255, 0)))
    with pytest.raises(StorageError, match="no space left on device") as err:
        save_checkpoint(run, 2, model, opt, sched, None, DistEnv())
    assert str(run) in str(err.value)
    assert "unexpected pos" in str(err.value.__cause__)  # it was torch.save that failed
    monkeypatch.undo()
    assert digest(dst) == before and digest(step1) == state_before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    fresh = small_model()
    fresh_opt = build_optimizer(fresh, lr=1e-3)
    load_checkpoint(step1, fresh, fresh_opt, build_scheduler(fresh_opt, "constant", 0, 10),
                    None, DistEnv())  # the previous checkpoint still loads
    assert (step1 / STATE).exists()


def test_unreadable_file_is_a_storage_error_naming_it(tmp_path, monkeypatch):
    small_model().save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"

    def denied(file, *args, **kwargs):  # root reads anything: the OS error is mocked
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
    monkeypatch.setattr("lmkit.checkpoint.safe_open", denied)
    with pytest.raises(StorageError, match=f"cannot read {weights}: permission denied"):
        lmkit.load(tmp_path / "ckpt")
