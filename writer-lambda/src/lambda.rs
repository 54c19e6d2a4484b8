//! The AWS Lambda mode: the handler under `lambda_runtime`.
//!
//! The runtime polls the Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`) for events, calls
//! [`handler::handle`] with the shared [`State`] and posts the result, or the error as a function
//! error with the [`Error`](crate::Error)'s `errorType` (`InvalidEvent`, `DatabaseError`) and its message
//! chain as `errorMessage`. The event is taken as raw JSON so that a malformed envelope gets the
//! writer's own clear error rather than a generic deserialization failure.

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

use crate::handler::{self, State};

/// Runs the Lambda runtime loop until the runtime API fails (in AWS: until the instance is shut down).
pub async fn run(state: &State) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        // The runtime's tracing layer already puts the request id in the span.
        let outcome = handler::handle(state, event.payload).await;
        if let Err(error) = &outcome {
            tracing::error!(
                error_type = error.error_type(),
                retryable = error.retryable(),
                error = %error.message_chain(),
                "invocation failed"
            );
        }
        outcome
    }))
    .await
}
