//! HTTP routes: the WebSocket endpoint, health, metrics, the embedded web client and,
//! in dev mode only, the token endpoint the web page uses to join without a backend.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chorus_protocol::client::Grants;
use serde::Deserialize;
use serde_json::json;

use crate::hub::Hub;
pub use crate::state::valid_room_name;
use crate::state::RoomSettings;
use crate::token::{mint, participant_claims, TokenVerifier};
use crate::ws::{session, HARD_FRAME_LIMIT};

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub verifier: Arc<TokenVerifier>,
    /// `Some((key, secret))` in dev mode: enables `POST /dev/token`.
    pub dev_key: Option<Arc<(String, String)>>,
}

// The web client is compiled in, so a single binary serves everything.
const INDEX_HTML: &str = include_str!("../../clients/web/index.html");
const APP_JS: &str = include_str!("../../clients/web/app.js");
const SDK_JS: &str = include_str!("../../clients/web/chorus-sdk.js");
const STYLE_CSS: &str = include_str!("../../clients/web/style.css");

pub fn router(state: AppState) -> Router {
    let mut r = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/index.html",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/chorus-sdk.js",
            get(|| async { asset("text/javascript; charset=utf-8", SDK_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws_upgrade))
        .route("/admin/rooms", get(admin_rooms))
        .route(
            "/admin/rooms/{room}",
            get(admin_room).patch(admin_patch_room),
        );
    if state.dev_key.is_some() {
        r = r.route("/dev/token", post(dev_token));
    }
    r.with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Initial WebSocket read buffer per connection.
const WS_READ_BUFFER: usize = 8 * 1024;

async fn ws_upgrade(ws: WebSocketUpgrade, State(st): State<AppState>) -> Response {
    ws.max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        // tungstenite zero-fills its whole read buffer (128 KiB by default) before
        // every read, so each connection kept 128 KiB resident: ~40% of the server's
        // memory per participant in the load test. Signaling messages are a few KB
        // (an SDP is the largest); bigger ones still arrive, the buffer grows for them.
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| session(socket, st.hub, st.verifier))
}

async fn metrics(State(st): State<AppState>) -> Response {
    let s = st.hub.stats();
    let body = format!(
        "# HELP chorus_signaling_rooms Rooms with at least one seat on this instance.\n# TYPE chorus_signaling_rooms gauge\nchorus_signaling_rooms {}\n\
         # HELP chorus_signaling_participants Seats on this instance, including those in their reconnect grace period.\n# TYPE chorus_signaling_participants gauge\nchorus_signaling_participants {}\n\
         # HELP chorus_signaling_sessions Seats with a connected WebSocket.\n# TYPE chorus_signaling_sessions gauge\nchorus_signaling_sessions {}\n\
         # HELP chorus_signaling_nodes SFU nodes connected to this instance.\n# TYPE chorus_signaling_nodes gauge\nchorus_signaling_nodes {}\n",
        s.rooms, s.participants, s.connected_sessions, s.nodes
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    name: String,
    room: String,
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"code": "bad_request", "message": message})),
    )
        .into_response()
}

async fn dev_token(
    State(st): State<AppState>,
    body: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(key) = st.dev_key.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(&format!("expected JSON {{\"name\", \"room\"}}: {e}")),
    };
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 64 {
        return bad_request("name must be 1 to 64 characters");
    }
    if !valid_room_name(&req.room) {
        return bad_request("room must be 1 to 64 characters of letters, digits, '-', '_' or '.'");
    }
    let slug: String = name
        .chars()
        .filter_map(|c| {
            if c.is_ascii_alphanumeric() {
                Some(c.to_ascii_lowercase())
            } else if c == ' ' || c == '-' || c == '_' {
                Some('-')
            } else {
                None
            }
        })
        .take(32)
        .collect();
    let slug = if slug.is_empty() {
        "guest".to_string()
    } else {
        slug
    };
    // Two tabs with the same name are two people; a short random suffix keeps them apart.
    let identity = format!("{slug}-{:04x}", rand::random::<u16>());
    let claims = participant_claims(
        &key.0,
        &req.room,
        &identity,
        Some(name),
        Duration::from_secs(6 * 3600),
        Grants::default_participant(),
    );
    match mint(&claims, &key.1) {
        Ok(token) => {
            Json(json!({"token": token, "identity": identity, "room": req.room})).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("minting failed: {e}"),
        )
            .into_response(),
    }
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

/// Checks `Authorization: Bearer <token>`: the token must carry the `admin` grant and be
/// for `room`, or for `*` (every room). Returns the token's room scope.
/// An admin API refusal, turned into a response only when it is returned (keeps the
/// `Result` small).
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        api_error(self.0, self.1, &self.2)
    }
}

fn admin_scope(st: &AppState, headers: &HeaderMap, room: Option<&str>) -> Result<String, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "send an admin access token as Authorization: Bearer <token>".into(),
            )
        })?;
    let claims = st
        .verifier
        .verify(token.trim())
        .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.code.as_str(), e.message))?;
    if !claims.grants.admin {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token has no admin grant".into(),
        ));
    }
    if claims.room != "*" && room.is_some_and(|r| r != claims.room) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this admin token is for room {:?} only", claims.room),
        ));
    }
    Ok(claims.room)
}

async fn admin_rooms(State(st): State<AppState>, headers: HeaderMap) -> Response {
    match admin_scope(&st, &headers, None) {
        Ok(scope) => {
            let only = (scope != "*").then_some(scope.as_str());
            match st.hub.rooms_overview(only).await {
                Ok(rooms) => Json(json!({"rooms": rooms})).into_response(),
                Err(e) => unavailable(&e),
            }
        }
        Err(e) => e.into_response(),
    }
}

async fn admin_room(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    if let Err(e) = admin_scope(&st, &headers, Some(&room)) {
        return e.into_response();
    }
    let rooms = match st.hub.rooms_overview(Some(&room)).await {
        Ok(r) => r,
        Err(e) => return unavailable(&e),
    };
    match rooms.into_iter().next() {
        Some(o) => Json(o).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such room (no seats and no settings)",
        ),
    }
}

async fn admin_patch_room(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Result<Json<RoomSettings>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(e) = admin_scope(&st, &headers, Some(&room)) {
        return e.into_response();
    }
    if !valid_room_name(&room) {
        return bad_request("room must be 1 to 64 characters of letters, digits, '-', '_' or '.'");
    }
    let Json(settings) = match body {
        Ok(b) => b,
        Err(e) => {
            return bad_request(&format!(
                "expected JSON {{\"enhanced_audio\": true|false|null}}: {e}"
            ))
        }
    };
    // The state writes to SQLite off the async workers, or to Redis.
    match st.hub.update_room_settings(&room, settings).await {
        Ok(settings) => Json(json!({"room": room, "settings": settings})).into_response(),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("could not save the room settings; nothing was changed: {e:#}"),
        ),
    }
}

fn unavailable(e: &crate::state::StateError) -> Response {
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &format!("{e}; try again in a moment"),
    )
}

/// Ready to take clients: the shared state answers. (`/healthz` only says the process
/// runs, so an orchestrator never kills an instance for a Redis outage.)
async fn readyz(State(st): State<AppState>) -> Response {
    match st.hub.state().check().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}
