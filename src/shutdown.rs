//! Shutdown: the signal that starts it. What a process does then is
//! [`crate::app::Application::run_until_stopped`]'s; the tests pass their own future instead.

use std::future::Future;

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: call it before the listeners answer, so a SIGTERM that
/// arrives while the process starts is a graceful shutdown too, never the default death.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
