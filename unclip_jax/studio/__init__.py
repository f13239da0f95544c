"""`unclip studio`: a local Gradio web app over the unCLIP pipelines (extra ``[studio]``).

``studio_main(argv)`` is the command; Gradio is imported only when it runs, so the core
package does not need it.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

INSTALL_HINT = "pip install -e '.[studio]'  (Gradio 5.x)"


def studio_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``unclip studio`` with ``argv`` (without the ``studio`` word); returns the exit
    code."""
    try:
        from unclip_jax.studio.app import studio_main as run
    except ImportError as e:
        if "gradio" not in str(e):
            raise
        print(f"unclip studio: error: the studio needs Gradio ({e}); install it with "
              f"{INSTALL_HINT}", file=sys.stderr)
        return 2
    return run(argv)


__all__ = ["studio_main"]
