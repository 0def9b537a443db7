//! `tasks.panic(message?)`: panics; the host must report a failure carrying the message.
use taskhost_sdk::task;

#[task]
fn panic(message: Option<String>) {
    panic!("{}", message.as_deref().unwrap_or("guest panicked on purpose"));
}
