"""The registry (lmkit.hub): bit-exact round trips, content addressing, immutable revisions,
name checks, integrity on pull, concurrent and interrupted pushers in real processes, the
local Hugging Face cache, and names resolved by every entry point (load, finetune, pipeline,
the CLI). Every test uses its own registry, cache and HF cache under tmp_path."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

import lmkit
from lmkit.errors import CheckpointError, RegistryError
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.finetune.inference import predict
from lmkit.hub import Registry, parse
from lmkit.hub.store import canonical
from lmkit.lineage import make_record
from lmkit.loading import locate
from lmkit.tokenizer import Tokenizer

NAME = "team/model"


@pytest.fixture(autouse=True)
def places(tmp_path, monkeypatch):
    """A registry, a cache and an (empty) Hugging Face cache of this test's own."""
    paths = {"LMKIT_REGISTRY": tmp_path / "registry", "LMKIT_CACHE": tmp_path / "cache",
             "HF_HUB_CACHE": tmp_path / "hf"}
    for key, path in paths.items():
        monkeypatch.setenv(key, str(path))
    return paths


def checkpoint(folder: Path, seed: int = 0, card: str | None = None) -> Path:
    """A tiny decoder checkpoint folder (plus a model card and a nested file)."""
    torch.manual_seed(seed)
    lmkit.Model(lmkit.preset("tiny-decoder")).save(folder)
    (folder / "README.md").write_text(card or "---\nlicense: mit\ntags: [tiny]\n---\n# tiny\n")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text(f"seed {seed}\n")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def blobs(root: Path) -> list[Path]:
    return [p for p in (root / "blobs").rglob("*") if p.is_file() and not p.name.startswith(".")]


def logits(model: lmkit.Model) -> torch.Tensor:
    return model(torch.tensor([[1, 5, 7, 9]])).logits


def test_push_pull_round_trip_is_bit_exact(tmp_path, places):
    src = checkpoint(tmp_path / "src")
    pushed = lmkit.push(src, NAME, message="first")
    assert pushed.new and pushed.tag == "main" and len(pushed.revision) == 64
    pulled = lmkit.pull(NAME, tmp_path / "dest")
    assert files_of(pulled.path) == files_of(src)
    cached = lmkit.pull(f"{NAME}@main")  # into the cache, named by the revision
    assert cached.path == places["LMKIT_CACHE"] / "team" / "model" / pushed.revision
    assert files_of(cached.path) == files_of(src)
    manifest = Registry().manifest(parse(NAME), pushed.revision)
    assert manifest["files"]["extra/notes.txt"] == {
        "size": 7, "sha256": hashlib.sha256(b"seed 0\n").hexdigest()}
    assert manifest["card"]["license"] == "mit" and manifest["card"]["family"] == "decoder"
    assert manifest["message"] == "first" and manifest["parent"] is None
    assert hashlib.sha256(canonical(manifest)).hexdigest() == pushed.revision


def test_same_files_are_stored_once(tmp_path, places):
    src = checkpoint(tmp_path / "src")
    first = lmkit.push(src, NAME)
    stored = blobs(places["LMKIT_REGISTRY"])
    assert len(stored) == len(files_of(src))
    again = lmkit.push(src, NAME)  # same files, same tag: no new revision, no new blob
    assert not again.new and again.revision == first.revision
    other = lmkit.push(src, "team/copy")  # another name: a new revision, the same blobs
    assert other.new and sorted(blobs(places["LMKIT_REGISTRY"])) == sorted(stored)
    tagged = lmkit.push(src, NAME, tag="v1")  # a new tag on the same files: tagged, not copied
    assert not tagged.new and tagged.revision == first.revision
    assert Registry().revisions(parse(NAME)) == [first.revision]
    assert Registry().tags(parse(NAME)) == {"main": first.revision, "v1": first.revision}


def test_revisions_are_immutable_and_load_by_id(tmp_path, places):
    one, two = checkpoint(tmp_path / "one", seed=1), checkpoint(tmp_path / "two", seed=2)
    first = lmkit.push(one, NAME, tag="v1")
    manifest_file = places["LMKIT_REGISTRY"] / f"models/team/model/revisions/{first.revision}.json"
    before = manifest_file.read_bytes()
    second = lmkit.push(two, NAME, tag="v1")
    assert second.new and second.revision != first.revision
    assert manifest_file.read_bytes() == before
    assert Registry().manifest(parse(NAME), second.revision)["parent"] == first.revision
    assert Registry().tags(parse(NAME)) == {"main": first.revision, "v1": second.revision}
    old = lmkit.load(f"{NAME}@{first.revision[:10]}")
    assert torch.equal(logits(old), logits(lmkit.load(one)))
    assert torch.equal(logits(lmkit.load(f"{NAME}@v1")), logits(lmkit.load(two)))
    assert lmkit.pull(NAME).revision == first.revision  # the first push made main
    with pytest.raises(RegistryError, match="no tag or revision 'v2'.*tags: main, v1"):
        lmkit.pull(f"{NAME}@v2")


def test_an_ambiguous_revision_prefix_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids = {}
    for i in range(17):  # 17 revisions: two share a first hex digit (pigeonhole)
        (src / "f.txt").write_text(str(i))
        rev = lmkit.push(src, NAME).revision
        ids.setdefault(rev[0], []).append(rev)
    digit, shared = next((d, r) for d, r in ids.items() if len(r) > 1)
    with pytest.raises(RegistryError, match=f"ambiguous: {len(shared)} revisions start with"):
        lmkit.pull(f"{NAME}@{digit}")
    assert lmkit.pull(f"{NAME}@{shared[0][:16]}").revision == shared[0]


@pytest.mark.parametrize("name, reason", [
    ("../etc/passwd", "'..'"), ("team/..", "'..'"), ("/abs/model", "absolute"),
    ("C:\\x/y", "absolute"), ("team\\x/model", "backslash"), ("team/mo\x00del", "control"),
    ("team/mo\ndel", "control"), ("team/", "empty"), ("/", "absolute"), ("team//x", "one '/'"),
    ("a/b/c", "one '/'"), ("team/model@", "empty"), ("team/model@a/b", "revision"),
    ("team/-x", "start with"), ("team/model@..", "path step"), ("model", "one '/'"),
])
def test_bad_names_are_refused(tmp_path, places, name, reason):
    src = checkpoint(tmp_path / "src")
    with pytest.raises(RegistryError, match=f"not a model name.*{reason}"):
        parse(name)
    with pytest.raises(RegistryError, match="not a model name"):
        lmkit.push(src, name)
    with pytest.raises(RegistryError, match="not a model name"):
        lmkit.pull(name)
    assert not (places["LMKIT_REGISTRY"] / "models").exists()


def test_bad_tags_and_unsafe_manifest_paths_are_refused(tmp_path, places):
    src = checkpoint(tmp_path / "src")
    for tag in ("../x", "a/b", "abc123", ""):
        with pytest.raises(RegistryError, match=f"tag {tag!r} cannot be used"):
            lmkit.push(src, NAME, tag=tag)
    with pytest.raises(RegistryError, match="without '@v1'"):
        lmkit.push(src, f"{NAME}@v1")
    # A hostile manifest (its id matching its bytes) naming a file outside the folder.
    good = lmkit.push(src, NAME)
    reg = Registry()
    manifest = reg.manifest(parse(NAME), good.revision)
    manifest["files"]["../../escaped.txt"] = manifest["files"].pop("extra/notes.txt")
    data = canonical(manifest)
    evil = hashlib.sha256(data).hexdigest()
    folder = places["LMKIT_REGISTRY"] / "models/team/model"
    (folder / "revisions" / f"{evil}.json").write_bytes(data)
    (folder / "tags" / "evil").write_text(evil)
    with pytest.raises(RegistryError, match="unsafe file path '../../escaped.txt'"):
        lmkit.pull(f"{NAME}@evil", tmp_path / "out" / "dest")
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "out" / "dest").exists()
    # A manifest of the wrong shape (its id matching its bytes) is refused, not a traceback.
    junk = canonical({"files": {"a": {"size": "big"}}})
    (folder / "revisions" / f"{hashlib.sha256(junk).hexdigest()}.json").write_bytes(junk)
    with pytest.raises(CheckpointError, match="not an lmkit revision manifest"):
        lmkit.pull(f"{NAME}@{hashlib.sha256(junk).hexdigest()[:20]}")
    # A manifest whose bytes changed no longer matches its id.
    manifest_file = folder / "revisions" / f"{good.revision}.json"
    manifest_file.write_bytes(manifest_file.read_bytes().replace(b'"mit"', b'"gpl"'))
    with pytest.raises(CheckpointError, match="does not match its id"):
        lmkit.pull(NAME)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_blob_is_detected_and_never_loaded(tmp_path, places, damage):
    src = checkpoint(tmp_path / "src")
    pushed = lmkit.push(src, NAME)
    weights = Registry().manifest(parse(NAME), pushed.revision)["files"]["model.safetensors"]
    blob = places["LMKIT_REGISTRY"] / "blobs/sha256" / weights["sha256"][:2] / weights["sha256"]
    data = blob.read_bytes()
    if damage == "flip":
        blob.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif damage == "truncate":
        blob.write_bytes(data[:len(data) // 2])
    else:
        blob.unlink()
    what = {"flip": "its sha256 is", "truncate": "truncated", "delete": "blob is missing"}
    message = f"model.safetensors is corrupted.*{what[damage]}.*sha256 {weights['sha256']}"
    with pytest.raises(CheckpointError, match=message):
        lmkit.pull(NAME, tmp_path / "dest")
    with pytest.raises(CheckpointError, match=message):
        lmkit.load(NAME)
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest.tmp-*"))
    assert not (places["LMKIT_CACHE"] / "team/model" / pushed.revision).exists()
    assert not list(places["LMKIT_CACHE"].rglob("*.safetensors"))  # no staging left either
    lmkit.push(src, "team/other")  # a push of the same file repairs a damaged size
    if damage != "flip":
        assert lmkit.pull(NAME, tmp_path / "dest2").path.is_dir()


PUSHER = textwrap.dedent("""
    import os, sys, time
    from lmkit.hub import store
    registry, folder, start = sys.argv[1:4]
    while not os.path.exists(start):  # every process starts pushing at once
        time.sleep(0.01)
    print(store.Registry(registry).push(folder, "team/model", message=folder).revision)
""")


def _verify_all(reg: Registry, tmp_path: Path) -> dict[str, dict]:
    """Every revision of NAME pulls with all its files verified; their manifests by id."""
    ref = parse(NAME)
    manifests = {r: reg.manifest(ref, r) for r in reg.revisions(ref)}
    for r in manifests:
        pulled = reg.pull(f"{NAME}@{r}", tmp_path / "check" / r)
        assert {k: hashlib.sha256(v).hexdigest() for k, v in files_of(pulled.path).items()} \
            == {k: e["sha256"] for k, e in manifests[r]["files"].items()}
    for blob in blobs(Path(reg.root)):  # nothing half-written under a blob's final name
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    return manifests


def test_eight_concurrent_pushers_leave_a_consistent_registry(tmp_path, places):
    shared = os.urandom(3 << 20)  # one blob every process writes at the same time
    folders = []
    for i in range(8):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        (folder / "shared.bin").write_bytes(shared)
        (folder / "own.txt").write_text(f"pusher {i}\n")
        folders.append(folder)
    registry, start = str(places["LMKIT_REGISTRY"]), tmp_path / "start"
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, registry, str(f), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in folders]
    time.sleep(1)
    start.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outs]
    pushed = {out.strip() for out, _ in outs}
    reg = Registry(registry)
    manifests = _verify_all(reg, tmp_path)
    assert set(manifests) == pushed and len(pushed) == 8
    # The lock serialised the pushes: main names the last one, whose parents reach every other.
    chain, rev = [], reg.tags(parse(NAME))["main"]
    while rev:
        chain.append(rev)
        rev = manifests[rev]["parent"]
    assert sorted(chain) == sorted(pushed)
    assert len(blobs(places["LMKIT_REGISTRY"])) == 1 + 8


KILLED = textwrap.dedent("""
    import sys, time
    from lmkit.hub import store
    registry, folder, point, marker = sys.argv[1:5]

    def stall(*args):
        open(marker, "w").close()
        time.sleep(600)

    if point == "blob":  # killed with part of a blob written
        chunks = store._chunks_checked

        def first_chunk_then_stall(file, sha):
            yield next(chunks(file, sha))
            stall()
        store._chunks_checked = first_chunk_then_stall
    elif point == "tag":  # killed after the manifest, before the tag (holding the lock)
        store.Registry._set_tag = stall
    else:  # a pull killed after its first file
        copy = store.Registry._copy_blob

        def copy_then_stall(self, *args):
            copy(self, *args)
            stall()
        store.Registry._copy_blob = copy_then_stall
        store.Registry(registry).pull("team/model")
    store.Registry(registry).push(folder, "team/model")
""")


def _kill_at(point: str, registry: Path, folder: Path, marker: Path) -> None:
    """Run KILLED until it reaches `point`, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(registry), str(folder), point,
                             str(marker)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("point", ["blob", "tag"])
def test_a_killed_push_leaves_the_registry_consistent(tmp_path, places, point):
    first = lmkit.push(checkpoint(tmp_path / "one", seed=1), NAME)
    two = checkpoint(tmp_path / "two", seed=2)
    (two / "big.bin").write_bytes(os.urandom(3 << 20))  # more than one chunk
    _kill_at(point, places["LMKIT_REGISTRY"], two, tmp_path / "marker")
    reg = Registry()
    assert reg.tags(parse(NAME)) == {"main": first.revision}  # the tag never moved
    manifests = _verify_all(reg, tmp_path)  # whatever is visible is complete
    assert len(manifests) == (1 if point == "blob" else 2)
    assert torch.equal(logits(lmkit.load(NAME)), logits(lmkit.load(tmp_path / "one")))
    again = lmkit.push(two, NAME)  # the killed holder's lock is gone with it
    assert again.new and reg.tags(parse(NAME)) == {"main": again.revision}
    _verify_all(reg, tmp_path / "after")


def test_a_killed_pull_leaves_no_revision_in_the_cache(tmp_path, places):
    pushed = lmkit.push(checkpoint(tmp_path / "one", seed=1), NAME)
    _kill_at("pull", places["LMKIT_REGISTRY"], tmp_path / "one", tmp_path / "marker")
    folder = places["LMKIT_CACHE"] / "team" / "model"
    staging = [p for p in folder.iterdir() if p.name.startswith(f".{pushed.revision}.tmp-")]
    assert staging and not (folder / pushed.revision).exists()  # killed midway, not visible
    located = locate(NAME)  # pulled again, whole
    assert located.path == folder / pushed.revision
    assert files_of(located.path) == files_of(tmp_path / "one")


def test_hf_cache_lookup_by_repo_id(tmp_path, places):
    import transformers as tf

    config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64)
    reference = tf.BertForMaskedLM(config).eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = places["HF_HUB_CACHE"] / "models--acme--tiny-bert"
    reference.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    located = locate("acme/tiny-bert")
    assert located.origin == {"kind": "hf-cache", "repo": "acme/tiny-bert", "commit": commit}
    assert located.path == repo / "snapshots" / commit
    ids = torch.tensor([[2, 15, 27, 40, 3]])
    by_name = lmkit.load("acme/tiny-bert")(ids).logits
    by_commit = lmkit.load(f"acme/tiny-bert@{commit}")(ids).logits
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(by_name, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(by_name, by_commit)
    # The registry comes first: a pushed model of the same name shadows the HF cache.
    pushed = lmkit.push(checkpoint(tmp_path / "mine"), "acme/tiny-bert")
    assert locate("acme/tiny-bert").origin["revision"] == pushed.revision
    with pytest.raises(RegistryError, match=f"acme/nothing is not a file or folder.*registry "
                       f"{places['LMKIT_REGISTRY']}.*Hugging Face cache {places['HF_HUB_CACHE']}"
                       ".*lmkit push FOLDER acme/nothing"):
        lmkit.load("acme/nothing")


def test_memory_registry_round_trip(tmp_path):
    src = checkpoint(tmp_path / "src")
    url = f"memory://lmkit-test-{os.getpid()}-{time.monotonic_ns()}"
    reg = Registry(url)
    pushed = reg.push(src, NAME, tag="v1", message="in memory")
    assert files_of(reg.pull(f"{NAME}@v1", tmp_path / "dest").path) == files_of(src)
    assert reg.list_models() == [{"name": NAME, "revisions": 1,
                                  "tags": {"main": pushed.revision, "v1": pushed.revision}}]
    located = locate(f"{NAME}@v1", registry=url)
    assert located.origin == {"kind": "registry", "name": NAME, "revision": pushed.revision,
                              "registry": url}
    assert torch.equal(logits(lmkit.load(located.path)), logits(lmkit.load(src)))


def test_a_pushed_gguf_file_resolves_to_the_file(tmp_path):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    lmkit.push(gguf, "team/gguf")
    located = locate("team/gguf")
    assert located.path.name == "tiny.Q4.gguf" and located.path.read_bytes() == gguf.read_bytes()


def test_names_resolve_in_load_finetune_and_pipeline(tmp_path, places):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the film was {w} and {v}" for w in ("good", "bad", "fine")
                                for v in ("long", "short", "loud")) * 4)
    tok = Tokenizer.train([corpus], "wordpiece", 200, family="encoder")
    base = tmp_path / "base"
    lmkit.Model(lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, pad_id=tok.pad_id)) \
        .save(base, tokenizer=tok)
    pushed = lmkit.push(base, "team/encoder")
    assert torch.equal(logits(lmkit.load("team/encoder").eval()), logits(lmkit.load(base)))
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(
        f"the film was {w}\t{'pos' if w == 'good' else 'neg'}\n" for w in ("good", "bad") * 8))
    run = finetune("team/encoder", FinetuneConfig(
        task="classification", train=str(train), out=str(tmp_path / "run"), steps=2,
        batch_size=4, progress=False, tensorboard=False, plot=False, device="cpu"))
    assert run.out_dir.is_dir()
    tuned = lmkit.push(run.out_dir, "team/encoder-sst")
    assert tuned.new and pushed.revision != tuned.revision
    stored = Registry().manifest(parse("team/encoder-sst"), tuned.revision)["files"]
    assert "task.json" in stored and not any(f.startswith("checkpoints/") for f in stored)
    by_path = lmkit.pipeline("classification", run.out_dir, device="cpu")
    by_name = lmkit.pipeline(None, "team/encoder-sst@main", device="cpu")
    texts = ["the film was good", "the film was bad"]
    assert by_name(texts) == by_path(texts)
    assert predict("team/encoder-sst", texts, device="cpu") == \
        by_path(texts)


def _lmkit(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkit.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


def test_cli_push_pull_list_info(tmp_path, places):
    one, two = checkpoint(tmp_path / "one", seed=1), checkpoint(tmp_path / "two", seed=2)
    record = make_record("pretrain", two, {"kind": "scratch"}, compute={"flops": 1234.0})
    card = yaml.safe_dump({"license": "mit", "lineage": record})
    (two / "README.md").write_text(f"---\n{card}---\n")
    env = {k: str(v) for k, v in places.items()}
    registry = ["--registry", str(tmp_path / "other")]  # the flag wins over LMKIT_REGISTRY
    out = _lmkit("push", str(one), NAME, "--message", "first", *registry, env=env)
    assert out.returncode == 0 and "(new revision)" in out.stdout, out.stderr
    first = out.stdout.split("-> ")[1].split()[0]
    out = _lmkit("push", str(two), NAME, "--tag", "v2", *registry, env=env)
    second = out.stdout.split("-> ")[1].split()[0]
    assert not (places["LMKIT_REGISTRY"]).exists()
    out = _lmkit("list", "team/*", *registry, env=env)
    assert out.stdout.strip() == f"{NAME}  2 revision(s)  main={first[:12]}, v2={second[:12]}"
    out = _lmkit("info", f"{NAME}@v2", *registry, env=env)
    assert out.returncode == 0, out.stderr
    assert f"{NAME}@{second[:12]} in the registry" in out.stdout
    assert '"license": "mit"' in out.stdout and "4 files [v2]" in out.stdout
    assert f"{first[:12]}" in out.stdout and f"parents: {first[:12]}" in out.stdout
    assert "(pretrain; base: from scratch)" in out.stdout and "| 1.23e+03 |" in out.stdout
    assert out.stdout.count("chain (newest first)") == 1 and '"family": "decoder"' in out.stdout
    out = _lmkit("pull", f"{NAME}@{first[:8]}", str(tmp_path / "dest"), *registry, env=env)
    assert out.returncode == 0 and files_of(tmp_path / "dest") == files_of(one)
    out = _lmkit("pull", "team/../x", *registry, env=env)
    assert out.returncode == 2 and out.stderr.startswith("lmkit: error: 'team/../x' is not a")
    out = _lmkit("pull", "team/missing", *registry, env=env)
    assert out.returncode == 2 and "has no model team/missing" in out.stderr
    three = checkpoint(tmp_path / "three", card=(two / "README.md").read_text())
    out = _lmkit("info", str(three), env=env)  # a folder's lineage, from its card
    assert out.returncode == 0 and "(pretrain; base: from scratch)" in out.stdout
