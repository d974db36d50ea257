//! Dashboard login (browser sessions) and operator account management.
//!
//! A login answers with an HttpOnly, Secure, SameSite=Strict session cookie and, in the body,
//! the session's CSRF token, which the page must echo in `X-CSRF-Token` on every request that
//! changes something ([`crate::auth::Caller`] checks it).

use std::sync::Arc;

use atrium_store::{Role, User, UserUpdate};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Body;
use super::error::ApiError;
use super::types::{
    ErrorBody, LoginRequest, NewUserRequest, PasswordChange, SessionView, UserUpdateRequest,
    UserView,
};
use crate::Ctx;
use crate::accounts::{self, SESSION_LIFETIME_MS};
use crate::auth::{Caller, SessionInfo, hash_secret};

fn user_view(u: User) -> UserView {
    UserView {
        username: u.username,
        role: u.role.as_str().to_owned(),
        disabled: u.disabled,
        created_ms: u.created_ms,
        updated_ms: u.updated_ms,
        last_login_ms: u.last_login_ms,
    }
}

fn parse_role(role: &str) -> Result<Role, ApiError> {
    role.parse::<Role>().map_err(|_| {
        ApiError::BadRequest(format!("unknown role {role:?}: admin, operator or viewer"))
    })
}

fn cookie_header(value: String) -> Result<HeaderMap, ApiError> {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&value)
        .map_err(|e| ApiError::Internal(format!("cookie header: {e}")))?;
    headers.insert(header::SET_COOKIE, value);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(headers)
}

fn session_of(caller: &Caller) -> Result<&SessionInfo, ApiError> {
    caller.session.as_ref().ok_or_else(|| {
        ApiError::BadRequest("this needs a dashboard session, not an API token".into())
    })
}

/// Logs in: checks the password and starts a browser session. Repeated failures lock the
/// username for a growing time (429).
#[utoipa::path(post, path = "/api/v1/session", request_body = LoginRequest, responses((status = 200, body = SessionView, description = "logged in; the session cookie is set"), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(ctx): State<Arc<Ctx>>,
    Body(request): Body<LoginRequest>,
) -> Result<Response, ApiError> {
    let now = crate::now_ms();
    let username = request.username.trim().to_owned();
    if let Err(locked) = ctx.logins.check(&username, now) {
        return Err(ApiError::TooManyRequests(format!(
            "too many failed logins; try again in {} s",
            (locked.retry_after_ms + 999) / 1000
        )));
    }
    let wrong = || ApiError::Unauthorized("wrong username or password".into());
    if request.password.len() > accounts::MAX_PASSWORD_BYTES {
        return Err(wrong());
    }
    let user = if accounts::validate_username(&username).is_ok() {
        ctx.store.user_by_name(&username).await?
    } else {
        None
    };
    let ok = ctx
        .logins
        .verify(
            request.password,
            user.as_ref().map(|u| u.password_hash.clone()),
        )
        .await;
    let user = match user {
        Some(u) if ok && !u.disabled => u,
        _ => {
            ctx.logins.failed(&username, crate::now_ms());
            tracing::warn!(username = %username.escape_debug(), "failed dashboard login");
            return Err(wrong());
        }
    };
    ctx.logins.succeeded(&username);
    let secret = accounts::random_token();
    let session = atrium_store::Session {
        id_hash: hash_secret(&secret),
        user_id: user.id.clone(),
        csrf_token: accounts::random_token(),
        created_ms: now,
        expires_ms: now + SESSION_LIFETIME_MS,
    };
    let actor = format!("user:{}", user.username);
    ctx.store
        .create_session(
            &session,
            crate::audit(&actor, "session.login", &user.username),
        )
        .await?;
    let body = SessionView {
        username: user.username,
        role: user.role.as_str().to_owned(),
        csrf_token: session.csrf_token,
        expires_ms: session.expires_ms,
    };
    Ok((cookie_header(accounts::set_cookie(&secret))?, Json(body)).into_response())
}

/// The account and CSRF token of the caller's browser session.
#[utoipa::path(get, path = "/api/v1/session", responses((status = 200, body = SessionView), (status = 401, body = ErrorBody)))]
pub async fn current(caller: Caller) -> Result<Response, ApiError> {
    let s = session_of(&caller)?;
    let body = SessionView {
        username: s.username.clone(),
        role: caller.role.as_str().to_owned(),
        csrf_token: s.csrf_token.clone(),
        expires_ms: s.expires_ms,
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

/// Logs out: ends the session and clears the cookie.
#[utoipa::path(delete, path = "/api/v1/session", responses((status = 204, description = "logged out")))]
pub async fn logout(State(ctx): State<Arc<Ctx>>, caller: Caller) -> Result<Response, ApiError> {
    let s = session_of(&caller)?;
    ctx.store
        .delete_session(&s.id_hash, caller.audit("session.logout", &s.username))
        .await?;
    Ok((
        StatusCode::NO_CONTENT,
        cookie_header(accounts::clear_cookie())?,
    )
        .into_response())
}

/// Changes the caller's own password; every session of the account ends (log in again).
#[utoipa::path(post, path = "/api/v1/session/password", request_body = PasswordChange, responses((status = 204, description = "changed; log in again"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn change_password(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(change): Body<PasswordChange>,
) -> Result<Response, ApiError> {
    let username = session_of(&caller)?.username.clone();
    accounts::validate_password(&change.new_password).map_err(ApiError::BadRequest)?;
    let user = ctx
        .store
        .user_by_name(&username)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("the account is gone".into()))?;
    if !ctx
        .logins
        .verify(change.current_password, Some(user.password_hash))
        .await
    {
        return Err(ApiError::Forbidden("the current password is wrong".into()));
    }
    let hash = ctx
        .logins
        .hash(change.new_password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    ctx.store
        .update_user(
            &username,
            UserUpdate {
                password_hash: Some(hash),
                ..UserUpdate::default()
            },
            caller.audit("user.password", &username),
        )
        .await?;
    Ok((
        StatusCode::NO_CONTENT,
        cookie_header(accounts::clear_cookie())?,
    )
        .into_response())
}

/// Operator accounts (admin).
#[utoipa::path(get, path = "/api/v1/users", security(("token" = [])), responses((status = 200, body = [UserView])))]
pub async fn list_users(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<UserView>>, ApiError> {
    caller.require(Role::Admin)?;
    let users = ctx.store.list_users().await?;
    Ok(Json(users.into_iter().map(user_view).collect()))
}

/// Creates an operator account (admin).
#[utoipa::path(post, path = "/api/v1/users", request_body = NewUserRequest, security(("token" = [])), responses((status = 201, body = UserView), (status = 409, body = ErrorBody)))]
pub async fn create_user(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<NewUserRequest>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    caller.require(Role::Admin)?;
    accounts::validate_username(&request.username).map_err(ApiError::BadRequest)?;
    accounts::validate_password(&request.password).map_err(ApiError::BadRequest)?;
    let role = parse_role(&request.role)?;
    let hash = ctx
        .logins
        .hash(request.password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let user = ctx
        .store
        .create_user(
            &request.username,
            role,
            &hash,
            caller
                .audit("user.create", &request.username)
                .with_details(serde_json::json!({ "role": role.as_str() })),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(user_view(user))))
}

/// Changes an operator account: role, password, disabled (admin). A new password or
/// disabling ends the account's sessions; the last enabled admin cannot be demoted or disabled.
#[utoipa::path(put, path = "/api/v1/users/{username}", request_body = UserUpdateRequest, security(("token" = [])), responses((status = 200, body = UserView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update_user(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(username): Path<String>,
    Body(request): Body<UserUpdateRequest>,
) -> Result<Json<UserView>, ApiError> {
    caller.require(Role::Admin)?;
    let role = request.role.as_deref().map(parse_role).transpose()?;
    let password_hash = match request.password {
        Some(p) => {
            accounts::validate_password(&p).map_err(ApiError::BadRequest)?;
            Some(
                ctx.logins
                    .hash(p)
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            )
        }
        None => None,
    };
    let details = serde_json::json!({
        "role": role.map(Role::as_str),
        "password_changed": password_hash.is_some(),
        "disabled": request.disabled,
    });
    let user = ctx
        .store
        .update_user(
            &username,
            UserUpdate {
                role,
                password_hash,
                disabled: request.disabled,
            },
            caller.audit("user.update", &username).with_details(details),
        )
        .await?;
    Ok(Json(user_view(user)))
}
