"""Offline teacher outputs: a teacher run once over a corpus (``alambic cache-teacher``), its top-k outputs stored
(:mod:`alambic.offline.store`), and distillation that reads them instead of running the teacher
(:mod:`alambic.offline.training`: the batches and the recipe of ``alambic distill --teacher-logits``)."""
