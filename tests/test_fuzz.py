"""The seeded fuzz subset (tests/fuzzing.py; `make fuzz` runs the full corpus): a few hundred
mutated checkpoint folders, training states, Hugging Face folders, GGUF files, data files and
bad command-line values, each run in a worker process under a memory cap and a timeout."""

import collections

from fuzzing import KINDS, OUTCOMES, fuzz, table

DATA = {k for k in KINDS if k.startswith("data ")}
# No input of these kinds may load as something else: lmkit's weights and config.json (checksums
# in the weights' metadata), training checkpoints (manifest.json: a damaged latest one is
# refused, and the run falls back to the previous intact one with a warning); data files whose
# lines are all checked; command-line values checked at parse time.
NO_SILENT_CHANGE = {"lmkit weights (crc)", "lmkit config.json", "training state",
                    "run checkpoint files", "cli values", *DATA}
# Not in NO_SILENT_CHANGE: "run config yaml". pretrain_config.yaml is the run's readable,
# editable record and carries no checksum; resume reads it strictly (a missing field is an
# error), but a valid value changed by hand (seed: 1000000) is the run the user asked for.
# Foreign files (HF, GGUF) and tokenizer.json carry no checksum either.
# No crash and no hang anywhere, except that a huge but valid value (grad_accum: 10^9) makes
# a resumed run take that long, by design.
SLOW_BY_DESIGN = {"run config yaml": {"hang"}}


def test_fuzz_subset():
    cases, results = fuzz(per_kind=14, seed=0, jobs=2, timeout=20.0, mem_mb=2048)
    print("\n" + table(cases, results))
    counts = collections.Counter((c["kind"], r["outcome"]) for c, r in zip(cases, results))
    bad = [f"{c['kind']}: {r['outcome']} ({c['op']} {c['args']}): {r['detail']}"
           for c, r in zip(cases, results)
           if (r["outcome"] in ("crash", "hang")
               and r["outcome"] not in SLOW_BY_DESIGN.get(c["kind"], set()))
           or (r["outcome"] == "silent change" and c["kind"] in NO_SILENT_CHANGE)]
    assert not bad, "\n".join(bad)
    for kind in KINDS:  # every kind was exercised, and bad inputs of it were refused
        assert sum(counts[kind, o] for o in OUTCOMES) == 14
        assert counts[kind, "clean error"] >= 3, (kind, table(cases, results))
