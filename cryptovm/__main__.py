"""``python -m cryptovm`` runs the server (see ``cryptovm.server``)."""

import sys

from cryptovm.server import main

sys.exit(main())
