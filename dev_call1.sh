source bench/device_setup.sh; set +e; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch;print(torch.__version__)"
C="--batch-sizes 16 --warmup 2 --iters 3 --no-sam-details --decoder-attention folded --compile-decoder --compile-encoder --fused-masks --point-batch-size 1024 --anchor-streams --compile-anchors depth,dino"
timeout 330 python bench/bench_precompute.py $C --bf16-decoder-tokens --json $OUT/pre_bf16.json 2>&1 | grep -v Warning | tee $OUT/pre_bf16.log | tail -40
timeout 240 python bench/bench_precompute.py $C --dtype fp32 --json $OUT/pre_fp32.json 2>&1 | grep -v Warning | tee $OUT/pre_fp32.log | tail -30
