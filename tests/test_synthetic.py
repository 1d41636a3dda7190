"""The LoRA write-ups' seed experiment, scaled down (train/run_synthetic.py runs it full size)."""

from train.tasks import synthetic


def test_rank_one_adapter_learns_the_shift_to_theta_plus_one():
  r = synthetic.run(n_in=101, n_out=100, rows=2000, batch=200, max_steps=2000)
  assert r["pretrained_mse"] < 1e-2
  assert r["shifted_mse_frozen"] > 50  # the frozen model is now far off (about n_in)
  assert r["lora_mse"] < 1e-2
  assert r["update_vs_ones_mae"] < 1e-2
  assert r["param_report"] == "trainable params: 201 || all params: 10,301 || trainable%: 1.9513"
