"""A milter protocol (version 6) client that talks to any milter as Postfix does.

Used by `milters probe`, by the protocol tests and by the benchmarks. One module
per concern:

- wire.py: libmilter's mfdef.h constants (SMFIC_* commands, SMFIR_* replies,
  SMFIF_* action flags, SMFIP_* protocol flags), the events, and packet data
  encoded and decoded;
- replies.py: what a milter answers at one stage (StageReply) and the
  modifications it asks for;
- session.py: MilterSession, the step-by-step dialogue, following what Postfix
  3.7's milter client (src/milter/milter8.c) does on the wire;
- probe.py: probe() and run_transaction(), a whole SMTP dialogue, returning a
  ProbeResult;
- report.py: format_probe(), the ProbeResult as an administrator reads it;
- edits.py: the header as pairs, with a milter's edits applied as Postfix does;
- errors.py: MilterClientError and its kinds.

The envelope a session sends is core/envelope.py's Envelope (the one `milters
test` runs offline), and the macro lists it sends are core/macros.py's.
"""
