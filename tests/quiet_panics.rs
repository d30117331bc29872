//! A task's panic is returned as `Error::Task` and not printed as well. (One test in its
//! own binary: the panic hook is process-wide.)

use metagrad::map_fn::map_tasks;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[test]
fn a_caught_task_panic_is_returned_not_printed_and_other_panics_still_are() {
    let printed = Arc::new(AtomicUsize::new(0));
    let count = printed.clone();
    std::panic::set_hook(Box::new(move |_| {
        count.fetch_add(1, Ordering::SeqCst);
    }));
    let r = map_tasks(4, 2, |i| {
        if i % 2 == 1 {
            panic!("task {i} fails");
        }
        i
    });
    match r {
        Err(metagrad::Error::Task { index, message }) => {
            assert_eq!((index, message.as_str()), (1, "task 1 fails"));
        }
        r => panic!("expected a task error, got {r:?}"),
    }
    assert_eq!(
        printed.load(Ordering::SeqCst),
        0,
        "a caught task panic was printed"
    );
    // A panic outside any task still reaches the hook installed before.
    let outside = std::panic::catch_unwind(|| panic!("not a task"));
    assert!(outside.is_err());
    assert_eq!(printed.load(Ordering::SeqCst), 1);
}
