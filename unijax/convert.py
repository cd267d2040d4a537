"""Convert transformers Janus-Pro and Emu3 checkpoints to unijax (Orbax) and back.

    python -m unijax.convert --hf_dir DIR --out CKPT [--dtype bfloat16] [--scan_layers] [--image_size 512]
    python -m unijax.convert --to_hf --ckpt CKPT --out DIR

The family is read from DIR/config.json (`janus` or `emu3`). A Janus directory's tokenizer files
(tokenizer.json, tokenizer_config.json, ...) are copied to CKPT/tokenizer after its special ids
were checked against the checkpoint's config (a mismatch names both values and writes nothing);
`data.tokenizer=checkpoint`, `unijax.generate` and `unijax.evaluate` read it from there.
"""

from absl import app, flags

from unijax import cli
from unijax.data.tokenizer import carried_tokenizer, check_compatible, hf_tokenizer
from unijax.hf.convert import checkpoint_to_hf, hf_to_checkpoint
from unijax.models import family
from unijax.models.config import family_of

flags.DEFINE_string("hf_dir", None, "transformers model directory (config.json + safetensors)")
flags.DEFINE_string("ckpt", None, "unijax model checkpoint directory (with --to_hf)")
flags.DEFINE_string("out", None, "output directory (must not exist unless --overwrite)")
flags.DEFINE_bool("to_hf", False, "convert a unijax checkpoint to a transformers directory")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype of the checkpoint")
flags.DEFINE_bool("scan_layers", False, "store decoder layers stacked for a scanned model")
flags.DEFINE_bool("overwrite", False, "replace an existing output directory")
flags.DEFINE_integer("image_size", 0, "Emu3 only: the square image size unijax batches use (0: a 64 x 64 code grid)")
FLAGS = flags.FLAGS


def checked_tokenizer(hf_dir, cfg) -> dict[str, bytes]:
    """`hf_dir`'s tokenizer files as `tokenizer/<name>`, after checking its special ids against `cfg`
    (Janus: pad / bos / eos / image / boi / eoi); none when the directory has no tokenizer, or when
    the family names its special tokens otherwise (`Family.checks_tokenizer`)."""
    files = carried_tokenizer(hf_dir)
    if not files or not family.of(cfg).checks_tokenizer:
        return {}
    try:
        check_compatible(hf_tokenizer(hf_dir), cfg)
    except ValueError as e:
        raise ValueError(f"{hf_dir}: the checkpoint's config.json and its tokenizer disagree: {e}") from None
    return files


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
                               overwrite=FLAGS.overwrite, image_size=FLAGS.image_size,
                               extra_files=lambda cfg: checked_tokenizer(FLAGS.hf_dir, cfg))
    t = cfg.text
    print(f"wrote {FLAGS.out}: {family_of(cfg)}, {t.num_layers} layers, hidden {t.hidden_size}, params {cfg.param_dtype}")


if __name__ == "__main__":
    cli.run(main)
