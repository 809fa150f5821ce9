//! The pairing routes:
//!
//! - `POST /v1/pairing/window` `{"duration_s": 300}` opens (or reopens with fresh codes) the
//!   window; `GET` shows it (claim code, confirmation code, QR payload and SVG, the device
//!   pairing now); `DELETE` closes it. Operator only.
//! - `POST /v1/pairing/claim?code=CODE`, body a Hello frame: a Welcome frame (200) or a
//!   Refusal frame (400 bad frame, 403 refused, 500 no credential). The only mutating route
//!   open without a bearer token: the window's one-time claim code authenticates it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::{PairingError, WindowView};
use crate::auth::{Principal, Role};
use crate::http::{ApiError, AppState};

/// Content type of pairing frames.
pub const FRAME_TYPE: &str = "application/vnd.cloudlet.pairing";

/// `POST /v1/pairing/window` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenWindow {
    /// How long the window stays open, seconds (1..=3600).
    pub duration_s: u64,
}

fn operator_only(who: Option<&Principal>) -> Result<(), ApiError> {
    match who {
        Some(p) if p.role == Role::Operator => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only the operator manages pairing",
            "send the operator's token",
        )),
    }
}

/// `POST /v1/pairing/window`.
pub async fn open_window(
    State(st): State<Arc<AppState>>,
    who: Option<Extension<Principal>>,
    body: axum::body::Bytes,
) -> Result<Json<WindowView>, ApiError> {
    operator_only(who.as_deref())?;
    let req: OpenWindow = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON: {e}"),
            "send {\"duration_s\": N} with N from 1 to 3600",
        )
    })?;
    st.pairing
        .open_window(Duration::from_secs(req.duration_s))
        .map(Json)
        .map_err(|e| {
            let status = if matches!(e, PairingError::BadDuration(_)) {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            ApiError::new(
                status,
                crate::store::error_chain(&e),
                "send {\"duration_s\": N} with N from 1 to 3600",
            )
        })
}

/// `GET /v1/pairing/window`: the operator's (it holds the claim code), so GET is checked
/// here, where the middleware lets reads through.
pub async fn window(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<WindowView>, ApiError> {
    let h = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let p = st.creds.check_role(h, &[Role::Operator]).map_err(|why| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("GET /v1/pairing/window needs the operator's credential: {why}"),
            "send `Authorization: Bearer <operator token>`",
        )
    })?;
    operator_only(Some(&p))?;
    Ok(Json(st.pairing.status()))
}

/// `DELETE /v1/pairing/window`.
pub async fn close_window(
    State(st): State<Arc<AppState>>,
    who: Option<Extension<Principal>>,
) -> Result<Json<WindowView>, ApiError> {
    operator_only(who.as_deref())?;
    st.pairing.close_window();
    Ok(Json(st.pairing.status()))
}

/// The claim's query.
#[derive(Debug, Deserialize)]
pub struct ClaimQuery {
    /// The window's claim code.
    #[serde(default)]
    pub code: String,
}

/// `POST /v1/pairing/claim?code=CODE`.
pub async fn claim(
    State(st): State<Arc<AppState>>,
    Query(q): Query<ClaimQuery>,
    body: Bytes,
) -> Response {
    let st2 = st.clone();
    let r = tokio::task::spawn_blocking(move || st2.pairing.claim(&q.code, &body)).await;
    let (frame, outcome) = match r {
        Ok(x) => x,
        Err(e) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "")
                .into_response()
        }
    };
    let status = match &outcome {
        Ok(_) => StatusCode::OK,
        Err(PairingError::Frame(_) | PairingError::Unexpected(_) | PairingError::Link(_)) => {
            StatusCode::BAD_REQUEST
        }
        Err(
            PairingError::WindowClosed
            | PairingError::BadNonce
            | PairingError::WrongClaimCode
            | PairingError::ClaimCodeUsed,
        ) => StatusCode::FORBIDDEN,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, [(header::CONTENT_TYPE, FRAME_TYPE)], frame).into_response()
}
