//! `mail.send(to, subject, body, sender=None)`: one message over plain SMTP (RFC 5321) to
//! the server the worker's `SMTP_SERVER` secret names; a temporary failure (4xx, or no
//! connection) retries, a permanent one (5xx) fails. Returns the server's final reply.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use taskhost_sdk::{task, Context, TaskError};

#[task]
fn send(ctx: &Context, to: Vec<String>, subject: String, body: String, sender: Option<String>) -> Result<String, TaskError> {
    let server = ctx.config("SMTP_SERVER").map_err(TaskError::fail)?.ok_or_else(|| TaskError::fail("no SMTP_SERVER secret on this worker"))?;
    let sender = match sender {
        Some(s) => s,
        None => ctx.config("SMTP_FROM").map_err(TaskError::fail)?.unwrap_or_else(|| "taskhost@localhost".into()),
    };
    if to.is_empty() {
        return Err(TaskError::fail("no recipients"));
    }
    for address in to.iter().chain([&sender]) {
        if address.contains(['\r', '\n', '<', '>']) {
            return Err(TaskError::fail(format!("{address:?} is not a mail address")));
        }
    }
    let stream = TcpStream::connect(server.as_str()).map_err(|e| {
        let message = format!("connecting to {server}: {e} (a manifest grants it with [grants] tcp = [{server:?}])");
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            TaskError::fail(message)
        } else {
            TaskError::retry(message)
        }
    })?;
    // No read timeout on WASI sockets: the task's time limit bounds a silent server.
    let mut smtp = Smtp { reader: BufReader::new(&stream), writer: &stream };
    smtp.expect(220)?;
    smtp.command("EHLO taskhost", 250)?;
    smtp.command(&format!("MAIL FROM:<{sender}>"), 250)?;
    for rcpt in &to {
        smtp.command(&format!("RCPT TO:<{rcpt}>"), 250)?;
    }
    smtp.command("DATA", 354)?;
    let headers = format!(
        "From: <{sender}>\r\nTo: {}\r\nSubject: {}\r\nMessage-ID: <{}@taskhost>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
        to.iter().map(|t| format!("<{t}>")).collect::<Vec<_>>().join(", "),
        subject.replace(['\r', '\n'], " "),
        ctx.id()
    );
    // Dot-stuffing: a line that starts with '.' gets another.
    let text: String = body.replace("\r\n", "\n").split('\n').map(|l| if l.starts_with('.') { format!(".{l}\r\n") } else { format!("{l}\r\n") }).collect();
    smtp.writer.write_all(headers.as_bytes()).and_then(|()| smtp.writer.write_all(text.as_bytes())).map_err(io)?;
    let accepted = smtp.command(".", 250)?;
    let _ = smtp.command("QUIT", 221);
    Ok(accepted)
}

fn io(e: std::io::Error) -> TaskError {
    TaskError::retry(format!("SMTP connection: {e}"))
}

struct Smtp<'a> {
    reader: BufReader<&'a TcpStream>,
    writer: &'a TcpStream,
}

impl Smtp<'_> {
    fn command(&mut self, line: &str, want: u16) -> Result<String, TaskError> {
        self.writer.write_all(format!("{line}\r\n").as_bytes()).map_err(io)?;
        self.expect(want)
    }

    /// Reads one (possibly multi-line) reply; 4xx retries, anything else unexpected fails.
    fn expect(&mut self, want: u16) -> Result<String, TaskError> {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(io)? == 0 {
                return Err(TaskError::retry("the SMTP server closed the connection"));
            }
            reply.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
            reply.push('\n');
        }
        let code: u16 = reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        match code {
            c if c == want => Ok(reply),
            400..=499 => Err(TaskError::retry(format!("SMTP server: {reply}"))),
            _ => Err(TaskError::fail(format!("SMTP server: {reply}"))),
        }
    }
}
