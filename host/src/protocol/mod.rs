//! Celery's wire formats, pure encode/decode with no I/O: task messages (protocol v2
//! inside kombu's Redis envelope, and its AMQP parts) and result-backend records.

pub mod amqp;
mod control;
pub mod events;
mod message;
mod result;

pub use message::{
    args_repr, band_for_priority, python_repr, decode, encode_task, kwargs_repr, list_for_priority, mark_redelivered, parse_time, priority_from, Decoded, Embed, Envelope, OutgoingTask, ProtocolError,
    Signature, TaskHeaders, BAND_SEP, MAX_MESSAGE_BYTES, PRIORITY_BANDS,
};
pub use control::{decode_control, encode_control, encode_reply, ControlRequest, ReplyTo, PIDBOX_EXCHANGE, REPLY_EXCHANGE};
pub use result::{ExceptionInfo, ResultRecord, State};

/// Now as the float Unix seconds Celery's headers, events and records carry.
pub fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}
