//! `tasks.spin()`: an infinite loop; only the hard time limit can stop it.
use taskhost_sdk::task;

#[task]
fn spin() -> u64 {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}
