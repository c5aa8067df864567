"""mitmproxy script entry: `mitmdump -s addons/egress_auth.py --set egress_auth_config=FILE`.

All logic lives in the `egress_auth` package; this file only hands mitmproxy the addon.
"""

from egress_auth.proxy.addon import EgressAuth

addons = [EgressAuth()]
