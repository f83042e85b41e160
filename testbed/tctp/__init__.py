"""TCTP over real HTTP: an aiohttp server and client for HALECs, the TRESOR client
proxy (plain HTTP in, TCTP out, Cedar authorization), nginx as a real intermediary,
a recording relay, and the demo. The protocol itself is sans-IO in
:mod:`trusted_passages.tctp`; docs/tctp.md."""
