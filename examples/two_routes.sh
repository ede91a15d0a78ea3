#!/usr/bin/env bash
# Two routes, one target (Korbak et al. 2022: KL-control is distribution matching): the tiny prior of
# examples/tiny_psi.yaml tilted by R(x) = #token 2, p_beta(x) ∝ a(x) exp(R(x)/beta), reached
#   - on-policy by reverse-KL f-DPG (examples/tiny_kl_control.yaml with this prior and reward), and
#   - offline by Psi-learning from 2000 samples of the prior (examples/tiny_psi.yaml),
# both scored by the same exact evaluator; draws both exact KL(p_beta || pi) curves into docs/two_routes.png.
#     bash examples/two_routes.sh [RUN_DIR]        # about a minute on one CPU core
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/two_routes}
common=(steps=300 eval.every=25 progress=false threads=1)
fdpg sample examples/tiny_psi.yaml --n 2000 --out "$out/batch.jsonl" --seed 1
fdpg train examples/tiny_psi.yaml "offline=$out/batch.jsonl" "output_dir=$out/psi" "${common[@]}"
fdpg train examples/tiny_kl_control.yaml "output_dir=$out/fdpg" "${common[@]}" \
  "prior={tiny: {vocab_size: 5, n_layer: 2, n_embd: 32, seed: 0, initializer_range: 0.3}}" \
  "target={reward: {type: token_count, token_id: 2, weight: 1.0}, beta: 1.0}"
fdpg plot "$out/fdpg" "$out/psi" --out docs/two_routes.png \
  --label "reverse-KL f-DPG (on-policy samples of pi)" --label "Psi-learning (offline: 2000 samples of a)" \
  --title "Two routes to p_beta: exact KL(p_beta || pi)"
