"""``python -m unclip_jax.studio [--model DIR] [--host H] [--port P] ...``"""
import sys

from unclip_jax.studio import studio_main

if __name__ == "__main__":
    sys.exit(studio_main(sys.argv[1:]))
