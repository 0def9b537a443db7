//! `tasks.tsum(values)`: the sum of a list of numbers (a chord callback's shape).
use taskhost_sdk::task;

#[task]
fn tsum(values: Vec<serde_json::Number>) -> serde_json::Value {
    if values.iter().all(|v| v.is_i64()) {
        serde_json::json!(values.iter().filter_map(|v| v.as_i64()).sum::<i64>())
    } else {
        serde_json::json!(values.iter().filter_map(|v| v.as_f64()).sum::<f64>())
    }
}
