cd /work/main
start=$(date +%s)
python3 -m brainseg.main --config configs/cpu.py --workdir /work/runs/ttt800 --config.num_train_steps=800 --config.eval_every_steps=200 --config.checkpoint_every_steps=800
echo "train wall: $(( $(date +%s) - start )) s"
python3 -m brainseg.evaluate --workdir /work/runs/ttt800 --split test --output /work/runs/ttt800/test
echo "total wall incl. test eval: $(( $(date +%s) - start )) s"
