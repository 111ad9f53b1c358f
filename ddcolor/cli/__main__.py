"""``python -m ddcolor.cli ...``: the `ddcolor` command without its script (what ``torchrun -m ddcolor.cli`` runs)."""

from ddcolor.cli import app

app()
