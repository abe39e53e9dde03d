"""The MTA's macro lists in one place: what Postfix sends at each stage, what our
filters need from it, and what the adapter reads where.

The adapter (core/adapter.py) reads the lists below out of libmilter
(core/macroreader.py); the milter client (milters/client/) sends Postfix's
default lists as Postfix does; `milters postfix-config` (install.py) checks that
Postfix's defaults carry what the filters need.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

# `postconf -d` of Postfix 3.7.11: milter_connect_macros ... milter_end_of_data_macros.
# Header events carry the end-of-header list, body chunks the end-of-data list.
DEFAULT_MACRO_LISTS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "connect": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
    "helo": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    "mail": (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
        "{mail_mailer}",
    ),
    "rcpt": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i",),
    "unknown": (),
})

# The macros our filters read, by the stage they must arrive at (the same for every
# filter: core/model.py). {daemon_name} tells mail submitted on the submission port
# (milter_macro_daemon_name=ORIGINATING), {auth_authen} tells a SASL client, `i` is the
# queue id in the logs. Postfix's default lists (DEFAULT_MACRO_LISTS) hold all three;
# a test checks against the installed Postfix.
NEEDED_MACROS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "connect": ("{daemon_name}",),
    "mail": ("{auth_authen}", "i"),
})

# Macros Postfix can send (postconf milter_*_macros); the adapter takes each at the
# stage Postfix sends it and remembers it from there on (`i` only arrives late by
# default). Each read of libmilter's lists costs the same whatever we take from it
# (about 20 us, core/macroreader.py), so the adapter reads only where a filter uses
# something: connect ({daemon_name}), MAIL ({auth_authen}, `i`) and end of message
# (`i`), not at HELO or RCPT. An odd list sent there is still seen at the next read.
CONNECT_MACROS = ("j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "v",
                  "{client_addr}", "{client_name}", "{client_port}", "{client_ptr}")
MAIL_MACROS = ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
               "{mail_host}", "{mail_mailer}")
EOM_MACROS = ("i",)
