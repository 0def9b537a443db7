//! Logging: `tracing` to stderr, human-readable by default or one JSON object per line,
//! filtered by `RUST_LOG` or the CLI's verbosity.
//!
//! Log text comes partly from outside (a guest's log lines, task names and ids from
//! producers), so the human format escapes control characters: every event stays one
//! line, and a guest's `\n` cannot forge a line of its own. JSON escapes them anyway.

pub mod events;
pub mod http;
pub mod inspect;
pub mod otlp;
pub mod metrics;
pub mod report;

use std::io::Write;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the global subscriber; later calls are ignored (tests call it repeatedly).
pub fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = match format {
        LogFormat::Human => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(OneLinePerEvent { keep_escape: ansi })
            .with_ansi(ansi)
            .with_target(false)
            .finish()
            .with(ExpectedAmqpRefusals)
            .try_init(),
        LogFormat::Json => {
            tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            // A task's line carries its span: id, task, version, queue, tenant.
            .with_current_span(true)
            .with_span_list(false)
                .finish()
                .with(ExpectedAmqpRefusals)
            .try_init()
        }
    };
}

/// Drops lapin's ERROR line for RabbitMQ's 406 to a queue declare whose arguments differ
/// from the existing queue's: taskhost declares on a channel of its own expecting that
/// answer, and then uses the queue as it was declared (as kombu's users see it).
struct ExpectedAmqpRefusals;

impl<S: tracing::Subscriber> Layer<S> for ExpectedAmqpRefusals {
    fn event_enabled(&self, event: &tracing::Event<'_>, _: Context<'_, S>) -> bool {
        if !event.metadata().target().starts_with("lapin") {
            return true;
        }
        let mut text = FieldText(String::new());
        event.record(&mut text);
        !is_expected_amqp_refusal(&text.0)
    }
}

fn is_expected_amqp_refusal(fields: &str) -> bool {
    fields.contains("PRECONDITION_FAILED") && fields.contains("inequivalent arg") && fields.contains("for queue")
}

/// An event's fields written out, to match on.
struct FieldText(String);

impl tracing::field::Visit for FieldText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

/// Stderr, with each formatted event's control characters escaped except the newline
/// that ends it (and ESC where colours are on: the terminal's own escapes).
#[derive(Clone, Copy)]
struct OneLinePerEvent {
    keep_escape: bool,
}

impl<'a> MakeWriter<'a> for OneLinePerEvent {
    type Writer = EscapingStderr;
    fn make_writer(&'a self) -> Self::Writer {
        EscapingStderr { keep_escape: self.keep_escape }
    }
}

struct EscapingStderr {
    keep_escape: bool,
}

impl Write for EscapingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer hands over one whole event per write.
        std::io::stderr().lock().write_all(&escape_event(buf, self.keep_escape))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `buf` with every control byte but tab (and ESC if `keep_escape`) written as `\n`,
/// `\r` or `\xNN`; one trailing newline is kept as the line's end.
fn escape_event(buf: &[u8], keep_escape: bool) -> Vec<u8> {
    let (body, end) = match buf.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (buf, &b""[..]),
    };
    let c1 = |i: usize| body[i] == 0xc2 && body.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n));
    if !body.iter().enumerate().any(|(i, b)| needs_escape(*b, keep_escape) || c1(i)) {
        return buf.to_vec();
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if needs_escape(b, keep_escape) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            // C1 controls (U+0080–U+009F, CSI among them) act like ESC sequences on terminals.
            _ if c1(i) => {
                out.extend_from_slice(format!("\\u{{{:x}}}", body[i + 1]).as_bytes());
                i += 1;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out.extend_from_slice(end);
    out
}

fn needs_escape(b: u8, keep_escape: bool) -> bool {
    (b < 0x20 && b != b'\t' && !(keep_escape && b == 0x1b)) || b == 0x7f
}

#[cfg(test)]
mod tests {
    use super::escape_event;

    #[test]
    fn lapins_error_for_an_expected_406_is_dropped_and_other_errors_are_kept() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tracing_subscriber::layer::SubscriberExt;
        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let seen = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(super::ExpectedAmqpRefusals).with(Count(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let inequivalent = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'media' in vhost '/': received none but current is the value '10' of type 'signedint'";
            tracing::error!(target: "lapin::channel", channel = 2, error = ?inequivalent, "Channel closed");
            assert_eq!(seen.load(Ordering::Relaxed), 0, "the expected refusal is dropped");
            tracing::error!(target: "lapin::channel", error = ?"ACCESS_REFUSED - access to queue 'media' refused", "Channel closed");
            tracing::error!(target: "taskhost::worker", error = ?inequivalent, "our own line");
            assert_eq!(seen.load(Ordering::Relaxed), 2, "other lapin errors and taskhost's own lines stay");
        });
    }

    #[test]
    fn an_event_stays_one_line_whatever_its_text() {
        let forged = b"INFO task log\nINFO succeeded task=tasks.payroll\r\x1b[2K\n";
        let out = String::from_utf8(escape_event(forged, false)).unwrap();
        assert_eq!(out, "INFO task log\\nINFO succeeded task=tasks.payroll\\r\\x1b[2K\n");
        assert_eq!(out.matches('\n').count(), 1);
        assert_eq!(escape_event(b"plain\tline\n", false), b"plain\tline\n");
        assert_eq!(escape_event(b"\x1b[32mINFO\x1b[0m x\n", true), b"\x1b[32mINFO\x1b[0m x\n");
        assert_eq!(escape_event("a\u{9b}2Kb é\n".as_bytes(), true), "a\\u{9b}2Kb é\n".as_bytes());
    }
}
