"""Convert transformers Janus-Pro and Emu3 checkpoints to unijax (Orbax) and back.

    python -m unijax.convert --hf_dir DIR --out CKPT [--dtype bfloat16] [--scan_layers] [--image_size 512]
    python -m unijax.convert --to_hf --ckpt CKPT --out DIR

The family is read from DIR/config.json (`janus` or `emu3`).
"""

from absl import app, flags

from unijax import cli
from unijax.hf.convert import checkpoint_to_hf, hf_to_checkpoint

flags.DEFINE_string("hf_dir", None, "transformers model directory (config.json + safetensors)")
flags.DEFINE_string("ckpt", None, "unijax model checkpoint directory (with --to_hf)")
flags.DEFINE_string("out", None, "output directory (must not exist unless --overwrite)")
flags.DEFINE_bool("to_hf", False, "convert a unijax checkpoint to a transformers directory")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype of the checkpoint")
flags.DEFINE_bool("scan_layers", False, "store decoder layers stacked for a scanned model")
flags.DEFINE_bool("overwrite", False, "replace an existing output directory")
flags.DEFINE_integer("image_size", 0, "Emu3 only: the square image size unijax batches use (0: a 64 x 64 code grid)")
FLAGS = flags.FLAGS


def main(argv):
    del argv

    if not FLAGS.out:
        raise app.UsageError("--out is required")
    if FLAGS.to_hf:
        if not FLAGS.ckpt:
            raise app.UsageError("--to_hf needs --ckpt CKPT")
        cfg = checkpoint_to_hf(FLAGS.ckpt, FLAGS.out, overwrite=FLAGS.overwrite)
    else:
        if not FLAGS.hf_dir:
            raise app.UsageError("--hf_dir DIR is required (or --to_hf --ckpt CKPT)")
        cfg = hf_to_checkpoint(FLAGS.hf_dir, FLAGS.out, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers,
                               overwrite=FLAGS.overwrite, image_size=FLAGS.image_size)
    t = cfg.text
    print(f"wrote {FLAGS.out}: {getattr(cfg, 'family', 'janus')}, {t.num_layers} layers, hidden {t.hidden_size}, params {cfg.param_dtype}")


if __name__ == "__main__":
    cli.run(main)
