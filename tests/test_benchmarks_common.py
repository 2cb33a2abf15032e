"""benchmarks.common: a re-run replaces only its own section of docs/performance.md; batches."""
import numpy as np

from benchmarks import common
from tipr_jax.models.clip import CLIPConfig


def test_write_section_replaces_only_its_section_and_keeps_findings(tmp_path):
  doc = tmp_path / "performance.md"
  doc.write_text("# Performance\n\n## A\n\nold a\n\n## B\n\nold b\n\n### Findings\n\nkeep me\n\n"
                 "## C\n\nc\n")
  common.write_section("## B", "## B\n\nnew b\n", doc)
  text = doc.read_text()
  assert "old b" not in text and "new b" in text
  assert text.index("## A") < text.index("new b") < text.index("keep me") < text.index("## C")
  assert "old a" in text and text.endswith("## C\n\nc\n")
  common.write_section("## D", "## D\n\nd\n", doc)  # a new section is appended
  assert doc.read_text().endswith("## C\n\nc\n\n## D\n\nd\n")
  common.write_section("## A", "## A\n\nnew a\n", doc)  # a title that prefixes nothing else
  assert doc.read_text().count("## A") == 1 and "old a" not in doc.read_text()


def test_masked_caption_batch_shapes_and_cap():
  cfg = CLIPConfig.tiny(vocab_size=100, context_length=64)
  b = common.masked_caption_batch(cfg, 6, pids=np.arange(6) // 2, cap=3)
  h, w = cfg.image_size
  assert b["images"].shape == (6, h, w, 3) and b["caption_ids"].shape == (6, 64)
  eot = b["caption_ids"].argmax(-1)
  assert np.all(b["caption_ids"][np.arange(6), eot] == 99) and np.all(b["caption_ids"][:, 0] == 98)
  masked = b["mlm_labels"] > 0
  assert np.all(masked.sum(1) >= 1) and np.all(masked.sum(1) <= 3)
  np.testing.assert_array_equal(b["mlm_labels"][masked], b["caption_ids"][masked])
  np.testing.assert_array_equal(b["pids"], [0, 0, 1, 1, 2, 2])
