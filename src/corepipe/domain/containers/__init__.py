"""Which container a crashed process belongs to: the model (model.py), the decision (identify.py) and
one small module per runtime family; this face re-exports what the layers above use."""

from corepipe.domain.containers.belongs import Process, pid_namespaces
from corepipe.domain.containers.identify import attribute, enrich, identify, of_process
from corepipe.domain.containers.model import Container, safe_name

__all__ = ["Container", "Process", "attribute", "enrich", "identify", "of_process", "pid_namespaces", "safe_name"]
