#!/usr/bin/python3
"""Submit one message with Python's smtplib, as an application would.

Reads a JSON request on stdin (see cmd/stsrelay/e2e_clients_test.go):
host, port, mode ("starttls" or "ssl"), tls_name (the name the relay's
certificate carries; the connection goes to host, an IP address), cafile,
user, password, from, to (list), subject, text, message_id, date, out.

The message is an email.message.EmailMessage sent with send_message, the
way the library's documentation shows; its flattened bytes, made the way
send_message makes them, are written to out so that the test can compare
them with what the MX received.
"""
import copy
import email.generator
import email.message
import io
import json
import smtplib
import ssl
import sys

req = json.load(sys.stdin)

msg = email.message.EmailMessage()
msg["From"] = req["from"]
msg["To"] = ", ".join(req["to"])
msg["Subject"] = req["subject"]
msg["Date"] = req["date"]
msg["Message-ID"] = req["message_id"]
msg.set_content(req["text"])

# What send_message puts on the wire for a message that needs no SMTPUTF8
# (smtplib.SMTP.send_message, Python 3.6 and later).
msg_copy = copy.copy(msg)
del msg_copy["Bcc"]
del msg_copy["Resent-Bcc"]
buf = io.BytesIO()
email.generator.BytesGenerator(buf).flatten(msg_copy, linesep="\r\n")
with open(req["out"], "wb") as f:
    f.write(buf.getvalue())

ctx = ssl.create_default_context(cafile=req["cafile"])


class SMTPSSL(smtplib.SMTP_SSL):
    # smtplib checks the certificate against the host it connects to; the
    # relay listens on an IP address and its certificate names it.
    def _get_socket(self, host, port, timeout):
        self._host = req["tls_name"]
        return super()._get_socket(host, port, timeout)


if req["mode"] == "ssl":
    s = SMTPSSL(req["host"], req["port"], local_hostname="client.test", context=ctx, timeout=20)
else:
    s = smtplib.SMTP(req["host"], req["port"], local_hostname="client.test", timeout=20)
    s._host = req["tls_name"]
    s.starttls(context=ctx)
s.login(req["user"], req["password"])
refused = s.send_message(msg, from_addr=req["from"], to_addrs=req["to"])
s.quit()
if refused:
    print("refused:", refused, file=sys.stderr)
    sys.exit(1)
