"""mitmproxy script entry: `mitmdump -s addons/egress_auth.py --set egress_auth_config=FILE`.

All logic lives in the `egress_auth` package; this file only hands mitmproxy the addon.
"""

import os
import sys

# mitmproxy puts this script's folder first on sys.path, where this very file would shadow
# the `egress_auth` package. Drop the folder; fall back to the checkout's src/ when the
# package is not installed.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    from egress_auth.proxy.addon import EgressAuth
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(_here), "src"))
    from egress_auth.proxy.addon import EgressAuth

addons = [EgressAuth()]
