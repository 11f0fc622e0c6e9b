"""``python -m steer.cli ...`` (what ``accelerate launch -m steer.cli`` runs)."""

from steer.cli.dispatch import main

raise SystemExit(main())
