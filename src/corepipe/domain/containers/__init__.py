"""Which container a crashed process belongs to: the model (model.py), the decision (identify.py) and
one small module per runtime family; this face re-exports what the layers above use."""

from corepipe.domain.containers.identify import enrich, identify
from corepipe.domain.containers.model import Container, safe_name

__all__ = ["Container", "enrich", "identify", "safe_name"]
