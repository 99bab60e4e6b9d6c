"""Outgoing mail over SMTP (smtplib, in a thread: never on the event loop).

`deliver_later` hands a message to a background task that retries with growing delays
(settings.mail_attempts, mail_retry_s) and logs what it could not deliver: a signup never
fails or waits because the mail server is down. Log lines name the recipient's domain and
the failure, never the message (it carries a one-time code).
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from ext.config import ExtSettings

log = logging.getLogger("ext.mail")

# Tasks in flight, referenced so the loop does not drop them before they finish.
_pending: set[asyncio.Task[bool]] = set()


def compose(settings: ExtSettings, to: str, subject: str, text: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="tracepipe.invalid")
    msg.set_content(text)
    return msg


def _send_blocking(settings: ExtSettings, msg: EmailMessage) -> None:
    timeout = settings.smtp_timeout_s
    smtp: smtplib.SMTP
    if settings.smtp_tls == "tls":
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=timeout,
                                context=ssl.create_default_context())
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
    with smtp:
        if settings.smtp_tls == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_username:
            smtp.login(settings.smtp_username, settings.smtp_password)
        smtp.send_message(msg)


async def send(settings: ExtSettings, msg: EmailMessage) -> bool:
    """Delivers with retries; False (logged) when every attempt failed."""
    domain = str(msg["To"]).rpartition("@")[2]
    delay = settings.mail_retry_s
    for attempt in range(1, settings.mail_attempts + 1):
        try:
            await asyncio.to_thread(_send_blocking, settings, msg)
            return True
        except (OSError, smtplib.SMTPException) as e:
            last = attempt == settings.mail_attempts
            log.warning("mail to @%s: attempt %d/%d failed: %s: %s%s", domain, attempt, settings.mail_attempts,
                        type(e).__name__, e, " (given up)" if last else f" (retry in {delay:.0f} s)")
            if last:
                return False
            await asyncio.sleep(delay)
            delay *= 2
    return False


def deliver_later(settings: ExtSettings, msg: EmailMessage) -> None:
    task = asyncio.get_running_loop().create_task(send(settings, msg))
    _pending.add(task)
    task.add_done_callback(_pending.discard)
