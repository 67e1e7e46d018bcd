#!/usr/bin/env bash
# Runs all llama-perplexity measurements sequentially (from the repo root); logs in $OUT.
set -u
B=${LLAMA_PERPLEXITY:-/work/llama/build/bin/llama-perplexity}
M=${MODEL:-target/model/SmolLM2-135M-Instruct.Q4_1.gguf}
T=tools/llamacpp/text.txt
R=${OUT:-target/llamacpp-runs}; mkdir -p $R
run() { # name, args...
  local name=$1; shift
  echo "CMD: llama-perplexity $*" > $R/$name.log
  local t0=$(date +%s)
  nice -n 15 $B "$@" >> $R/$name.log 2>&1
  local rc=$?
  echo "RC: $rc WALL_S: $(( $(date +%s) - t0 ))" >> $R/$name.log
  echo "$(date +%T) $name rc=$rc" >> $R/progress.txt
}
for cfg in "512 40" "2048 10"; do
  set -- $cfg; C=$1; N=$2
  BASE=$R/base_f16_c$C.kld
  run base_f16_c$C -m $M -f $T -c $C -fa on -t 2 -ctk f16 -ctv f16 --chunks $N --kl-divergence-base $BASE
  for X in q8_0 q4_0 q4_1 iq4_nl f16; do
    run kld_${X}_c$C -m $M -f $T -c $C -fa on -t 2 -ctk $X -ctv $X --chunks $N --kl-divergence --kl-divergence-base $BASE
  done
done
echo "$(date +%T) ALL DONE" >> $R/progress.txt
