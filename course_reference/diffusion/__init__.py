"""Part V's reference: samplers of the tiny DiT (``sampling``), its training (``train``), and the
digit classifier that measures its samples' quality (``quality``)."""
