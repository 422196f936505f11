"""The seeded fuzz subset (tests/fuzzing.py; `make fuzz` runs the full corpus): a few hundred
mutated checkpoint folders, training states, Hugging Face folders, GGUF files, data files and
bad command-line values, each run in a worker process under a memory cap and a timeout."""

import collections

from fuzzing import KINDS, OUTCOMES, fuzz, table

DATA = {k for k in KINDS if k.startswith("data ")}
# No input of these kinds may load as something else: checksummed weights; data files whose
# lines are all checked; command-line values checked at parse time.
NO_SILENT_CHANGE = {"lmkit weights (crc)", "cli values", *DATA}
# TIGHTEN AFTER MERGING harden-a (issue 9 items 1-2): outcomes still allowed here because the
# detection is harden-a's work. Then: no crash or hang anywhere, and "training state",
# "run config yaml", "lmkit config.json" join NO_SILENT_CHANGE (checksummed / strict).
NOT_YET = {
    # a crafted optimizer tensor of the wrong shape: the fused AdamW writes out of bounds
    "training state": {"crash"},
    # values of the wrong type fail inside the model build; with 10^9 layers the model is
    # built (for minutes) before any tensor is checked
    "lmkit config.json": {"crash", "hang"},
    "hf config.json": {"crash", "hang"},
}
# Not a defect: a huge but valid value (grad_accum: 10^9) makes a resumed run take that long.
SLOW_BY_DESIGN = {"run config yaml": {"hang"}}


def test_fuzz_subset():
    cases, results = fuzz(per_kind=14, seed=0, jobs=2, timeout=20.0, mem_mb=2048)
    print("\n" + table(cases, results))
    counts = collections.Counter((c["kind"], r["outcome"]) for c, r in zip(cases, results))
    bad = [f"{c['kind']}: {r['outcome']} ({c['op']} {c['args']}): {r['detail']}"
           for c, r in zip(cases, results)
           if (r["outcome"] in ("crash", "hang")
               and r["outcome"] not in NOT_YET.get(c["kind"], set()) | SLOW_BY_DESIGN.get(
                   c["kind"], set()))
           or (r["outcome"] == "silent change" and c["kind"] in NO_SILENT_CHANGE)]
    assert not bad, "\n".join(bad)
    for kind in KINDS:  # every kind was exercised, and bad inputs of it were refused
        assert sum(counts[kind, o] for o in OUTCOMES) == 14
        assert counts[kind, "clean error"] >= 3, (kind, table(cases, results))
