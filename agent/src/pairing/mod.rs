//! Pairing: how a phone gets its own credential from this appliance — over USB (Android Open
//! Accessory, [`usb`]) or, without USB, with the one-time claim code of the manager's QR code
//! (`POST /v1/pairing/claim`, [`api`]). Same messages (`format::pairing`), two transports.
//!
//! ```text
//! USB:    appliance ── Challenge(nonce, confirmation code) ─▶ phone
//!         appliance ◀─ Hello(nonce, device id, name, model) ── phone
//!         appliance ── Welcome(credential, API, fingerprint, Wi-Fi) | Refusal ─▶ phone
//! claim:  POST /v1/pairing/claim?code=CLAIM_CODE, body Hello(claim_nonce(code), …)
//!         ◀─ Welcome | Refusal
//! ```
//!
//! Pairing happens only while the operator holds a [`window::PairingWindow`] open. A
//! credential is issued (by the [`CredentialIssuer`]) only after every check has passed:
//! window open, claim code right and unused (claim), frame intact, a Hello, the nonce this
//! session expects. Anything else gets a Refusal and changes nothing.

pub mod api;
pub mod issuer;
pub mod qr;
pub mod usb;
pub mod window;

use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use format::pairing::{
    Challenge, Hello, Message, PairingError as FrameError, Reason, Refusal, Welcome, WifiProfile,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use window::{CodeCheck, DeviceSeen, PairingWindow};

pub use issuer::{unix_now, CredentialIssuer, IssuedCredential, MemoryIssuer};
pub use qr::QrPayload;

/// Path of the claim route (open without a bearer token: the claim code authenticates it).
pub const CLAIM_PATH: &str = "/v1/pairing/claim";
/// Bytes of a USB session nonce.
pub const NONCE_LEN: usize = 32;

/// Why a pairing attempt failed, or the window could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    /// No window is open.
    #[error("no pairing window is open: the operator opens one (`agent pair --window 5m` or the manager's \"Pair a device\")")]
    WindowClosed,
    /// The Hello does not echo this session's nonce.
    #[error(
        "the Hello does not answer this session's challenge (replayed or from another session)"
    )]
    BadNonce,
    /// The frame is damaged or malformed.
    #[error("the pairing frame was refused")]
    Frame(#[source] FrameError),
    /// A message other than the one expected.
    #[error("expected a Hello, got a {0:?}")]
    Unexpected(format::pairing::Kind),
    /// The claim code is not the window's.
    #[error("the claim code is not this pairing window's: scan the QR code the manager shows now")]
    WrongClaimCode,
    /// The claim code was used already.
    #[error("the claim code was already used: the operator opens a new pairing window for another device")]
    ClaimCodeUsed,
    /// The issuer failed.
    #[error("the appliance could not issue a credential")]
    Issue(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The transport failed (the phone left, timed out, sent no frame).
    #[error("the pairing link failed")]
    Link(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A window duration out of range.
    #[error("a pairing window lasts from 1 s to 1 h, not {0:?}")]
    BadDuration(Duration),
    /// No random bytes.
    #[error("cannot read random bytes")]
    Random(#[source] std::io::Error),
    /// Too few random bytes to draw the codes (the kernel's randomness ran dry).
    #[error("not enough random bytes to draw the pairing codes")]
    ShortRandom,
    /// A QR payload that does not parse.
    #[error("not a pairing QR code: {0}")]
    BadQr(&'static str),
    /// The QR code could not be made.
    #[error("cannot render the QR code")]
    Qr(#[source] qrcode::types::QrError),
    /// A message that cannot be written (a field out of bounds).
    #[error("cannot write the pairing answer")]
    Emit(#[source] FrameError),
    /// The Wi-Fi profile file cannot be used.
    #[error("{0} is not a usable Wi-Fi profile ({1}): write {{\"ssid\": 1-32 bytes, \"passphrase\": 8-63 characters}}")]
    Wifi(std::path::PathBuf, String),
}

/// File name, in the data directory, of the Wi-Fi profile a Welcome carries (JSON
/// `{"ssid": …, "passphrase": …}`; kept out of the board file, which holds no secret).
pub const WIFI_FILE: &str = "wifi.json";

/// The Wi-Fi profile of the data directory `data`: `None` without the file.
pub fn load_wifi(data: &std::path::Path) -> Result<Option<WifiProfile>, PairingError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        ssid: String,
        passphrase: String,
    }
    let path = data.join(WIFI_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PairingError::Wifi(path, e.to_string())),
    };
    let r: Raw =
        serde_json::from_str(&text).map_err(|e| PairingError::Wifi(path.clone(), e.to_string()))?;
    let n = r.passphrase.chars().count();
    if r.ssid.is_empty() || r.ssid.len() > 32 || !(8..=63).contains(&n) {
        return Err(PairingError::Wifi(path, "a field is out of bounds".into()));
    }
    Ok(Some(WifiProfile {
        ssid: r.ssid,
        passphrase: r.passphrase,
    }))
}

impl PairingError {
    /// The reason a Refusal carries for it.
    pub fn reason(&self) -> Reason {
        match self {
            PairingError::WindowClosed => Reason::WindowClosed,
            PairingError::BadNonce => Reason::BadNonce,
            PairingError::Frame(_) | PairingError::Unexpected(_) | PairingError::Link(_) => {
                Reason::BadFrame
            }
            PairingError::WrongClaimCode => Reason::WrongClaimCode,
            PairingError::ClaimCodeUsed => Reason::ClaimCodeUsed,
            _ => Reason::Internal,
        }
    }

    /// The Refusal frame for it (the text bounded to what the frame holds).
    pub fn refusal(&self) -> Vec<u8> {
        let mut text = crate::store::error_chain(self);
        while text.len() > 256 {
            text.pop();
        }
        Message::Refusal(Refusal {
            reason: self.reason(),
            text,
        })
        .emit()
        .unwrap_or_default()
    }
}

pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>, PairingError> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(PairingError::Random)?;
    Ok(b)
}

pub(crate) fn hex_random(n: usize) -> Result<String, PairingError> {
    Ok(crate::store::hex(&random_bytes(n)?))
}

/// The Hello nonce of a claim over HTTPS (no Challenge there): the first 32 bytes of
/// SHA-256("cloudlet-pairing-claim-v1" 0x00 code). It binds the Hello to its claim code.
pub fn claim_nonce(code: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"cloudlet-pairing-claim-v1\0");
    h.update(code.as_bytes());
    h.finalize().to_vec()
}

/// What the Welcome tells a device about this appliance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplianceFacts {
    /// The appliance id.
    pub appliance_id: String,
    /// API base URLs ("https://IP:PORT"); the first goes into the QR code.
    pub api: Vec<String>,
    /// SHA-256 of the API's TLS certificate (all zeros until the API serves TLS).
    pub fingerprint: [u8; 32],
    /// The board's Wi-Fi network, if it has one.
    pub wifi: Option<WifiProfile>,
}

/// A device that paired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paired {
    /// What it said in its Hello.
    pub device: DeviceSeen,
    /// When its credential expires.
    pub expires_unix: u64,
}

/// The transport of the exchange.
pub trait FrameLink {
    /// Sends one whole frame.
    fn send(&mut self, frame: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Receives one whole frame.
    fn recv(&mut self) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>>;
}

impl<D: usb_aoa::UsbDevice> FrameLink for usb_aoa::link::AccessoryLink<D> {
    fn send(&mut self, frame: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.send_frame(frame)?)
    }

    fn recv(&mut self) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.recv_frame()?)
    }
}

/// How a session began.
#[derive(Clone, Debug)]
pub enum Session {
    /// Over USB: the appliance sends a Challenge with a fresh nonce first.
    Usb,
    /// A claim with this code: no Challenge; the nonce is [`claim_nonce`].
    Claim(String),
}

/// The window status the API shows the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowView {
    /// A window is open.
    pub open: bool,
    /// Seconds left.
    pub expires_in_s: u64,
    /// The one-time claim code (in the QR code).
    pub claim_code: Option<String>,
    /// The claim code was used.
    pub claim_used: bool,
    /// The code the phone shows beside the manager's, so the operator sees who pairs.
    pub confirmation_code: Option<String>,
    /// The QR code's content.
    pub qr_payload: Option<String>,
    /// The QR code, SVG.
    pub qr_svg: Option<String>,
    /// The device pairing now (or last) in this window.
    pub pending_device: Option<DeviceSeen>,
    /// Devices paired in this window.
    pub paired: Vec<DeviceSeen>,
}

/// The appliance's pairing state: the window, the facts a Welcome carries, the issuer.
pub struct Pairing {
    window: Mutex<Option<PairingWindow>>,
    facts: RwLock<ApplianceFacts>,
    issuer: Arc<dyn CredentialIssuer>,
}

impl Pairing {
    /// No window open.
    pub fn new(facts: ApplianceFacts, issuer: Arc<dyn CredentialIssuer>) -> Pairing {
        Pairing {
            window: Mutex::new(None),
            facts: RwLock::new(facts),
            issuer,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<PairingWindow>> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The facts a Welcome carries.
    pub fn facts(&self) -> ApplianceFacts {
        self.facts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the API listens (known once it is bound).
    pub fn set_api(&self, api: Vec<String>) {
        self.facts.write().unwrap_or_else(|e| e.into_inner()).api = api;
    }

    /// The TLS certificate's SHA-256 (set by the TLS set-up).
    pub fn set_fingerprint(&self, fp: [u8; 32]) {
        self.facts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .fingerprint = fp;
    }

    /// Opens (or reopens, with fresh codes) the window for `d`.
    pub fn open_window(&self, d: Duration) -> Result<WindowView, PairingError> {
        let w = PairingWindow::open(Instant::now(), d, &random_bytes(256)?)?;
        tracing::info!(
            seconds = d.as_secs(),
            confirmation = w.confirm(),
            "pairing window opened"
        );
        *self.lock() = Some(w);
        Ok(self.status())
    }

    /// Closes the window.
    pub fn close_window(&self) {
        if self.lock().take().is_some() {
            tracing::info!("pairing window closed");
        }
    }

    /// The window as the operator sees it.
    pub fn status(&self) -> WindowView {
        let now = Instant::now();
        let mut g = self.lock();
        if g.as_ref().is_some_and(|w| !w.is_open(now)) {
            *g = None;
            tracing::info!("pairing window expired");
        }
        let Some(w) = g.as_ref() else {
            return WindowView {
                open: false,
                expires_in_s: 0,
                claim_code: None,
                claim_used: false,
                confirmation_code: None,
                qr_payload: None,
                qr_svg: None,
                pending_device: None,
                paired: Vec::new(),
            };
        };
        let f = self.facts();
        let qr = QrPayload {
            appliance_id: f.appliance_id,
            api: f.api.first().cloned().unwrap_or_default(),
            fingerprint: f.fingerprint,
            code: w.claim_code().to_string(),
        };
        WindowView {
            open: true,
            expires_in_s: w.remaining(now).as_secs_f64().ceil() as u64,
            claim_code: Some(w.claim_code().to_string()),
            claim_used: w.claim_used(),
            confirmation_code: Some(w.confirm().to_string()),
            qr_payload: Some(qr.to_uri()),
            qr_svg: qr
                .svg()
                .map_err(|e| tracing::warn!("no QR code: {}", crate::store::error_chain(&e)))
                .ok(),
            pending_device: w.pending.clone(),
            paired: w.paired.clone(),
        }
    }

    /// Runs one exchange over `link`: a Challenge first over USB, then the device's Hello,
    /// then a Welcome or a Refusal. The Refusal is sent (best effort) and the error returned.
    pub fn exchange<L: FrameLink>(
        &self,
        link: &mut L,
        session: Session,
    ) -> Result<Paired, PairingError> {
        let r = self.exchange_inner(link, &session);
        match &r {
            Ok(p) => {
                tracing::info!(device = %p.device.id, name = %p.device.name, model = %p.device.model, via = %p.device.via, "device paired")
            }
            Err(e) => {
                tracing::warn!("pairing refused: {}", crate::store::error_chain(e));
                if !matches!(e, PairingError::Link(_)) {
                    let _ = link.send(&e.refusal());
                }
            }
        }
        r
    }

    fn exchange_inner<L: FrameLink>(
        &self,
        link: &mut L,
        session: &Session,
    ) -> Result<Paired, PairingError> {
        let nonce = match session {
            Session::Usb => {
                let confirm = {
                    let mut g = self.lock();
                    match g.as_mut().filter(|w| w.is_open(Instant::now())) {
                        Some(w) => w.confirm().to_string(),
                        None => return Err(PairingError::WindowClosed),
                    }
                };
                let nonce = random_bytes(NONCE_LEN)?;
                let c = Message::Challenge(Challenge {
                    nonce: nonce.clone(),
                    confirm,
                })
                .emit()
                .map_err(PairingError::Emit)?;
                link.send(&c).map_err(PairingError::Link)?;
                nonce
            }
            Session::Claim(code) => claim_nonce(code),
        };
        let hello = link.recv().map_err(PairingError::Link)?;
        let (welcome, paired) = self.answer(&hello, &nonce, session)?;
        let frame = Message::Welcome(welcome)
            .emit()
            .map_err(PairingError::Emit)?;
        link.send(&frame).map_err(PairingError::Link)?;
        Ok(paired)
    }

    /// Checks a Hello and issues the credential: the heart of both transports.
    fn answer(
        &self,
        hello: &[u8],
        nonce: &[u8],
        session: &Session,
    ) -> Result<(Welcome, Paired), PairingError> {
        let mut g = self.lock();
        let now = Instant::now();
        let w = match g.as_mut() {
            Some(w) if w.is_open(now) => w,
            _ => return Err(PairingError::WindowClosed),
        };
        let via = match session {
            Session::Usb => "usb",
            Session::Claim(code) => {
                match w.check_code(code) {
                    CodeCheck::Good => {}
                    CodeCheck::Wrong => {
                        if !w.is_open(now) {
                            tracing::warn!(
                                "pairing window closed after {} wrong claim codes",
                                w.wrong_codes()
                            );
                        }
                        return Err(PairingError::WrongClaimCode);
                    }
                    CodeCheck::Used => return Err(PairingError::ClaimCodeUsed),
                }
                "claim"
            }
        };
        let h: Hello = match Message::parse(hello).map_err(PairingError::Frame)? {
            Message::Hello(h) => h,
            m => return Err(PairingError::Unexpected(m.kind())),
        };
        let mut seen = DeviceSeen {
            id: h.device_id.clone(),
            name: h.name.clone(),
            model: h.model.clone(),
            via: via.into(),
            state: "pairing".into(),
        };
        if !h.answers(nonce) {
            seen.state = "refused".into();
            w.pending = Some(seen);
            return Err(PairingError::BadNonce);
        }
        w.pending = Some(seen.clone());
        let cred = match self.issuer.issue(&h.device_id, &h.name, &h.model) {
            Ok(c) => c,
            Err(e) => {
                seen.state = "refused".into();
                w.pending = Some(seen);
                return Err(PairingError::Issue(e));
            }
        };
        let f = self.facts();
        let welcome = Welcome {
            appliance_id: f.appliance_id,
            api: f.api,
            fingerprint: f.fingerprint,
            secret: cred.secret,
            expires_unix: cred.expires_unix,
            wifi: f.wifi,
        };
        // Written before anything is spent: a Welcome that cannot be written spends nothing
        // (the issued credential is then never seen by anyone).
        Message::Welcome(welcome.clone())
            .emit()
            .map_err(PairingError::Emit)?;
        if matches!(session, Session::Claim(_)) {
            w.use_code();
        }
        seen.state = "paired".into();
        w.pending = Some(seen.clone());
        w.paired.push(seen.clone());
        Ok((
            welcome,
            Paired {
                device: seen,
                expires_unix: cred.expires_unix,
            },
        ))
    }

    /// A claim over HTTPS: `hello` (a Hello frame) with the window's claim `code`. Returns
    /// the answer frame (Welcome or Refusal) and the outcome.
    pub fn claim(&self, code: &str, hello: &[u8]) -> (Vec<u8>, Result<Paired, PairingError>) {
        let mut link = OneShot {
            hello: Some(hello.to_vec()),
            answer: Vec::new(),
        };
        let r = self.exchange(&mut link, Session::Claim(code.to_string()));
        (link.answer, r)
    }
}

/// The claim's link: the posted Hello in, the answer out.
struct OneShot {
    hello: Option<Vec<u8>>,
    answer: Vec<u8>,
}

impl FrameLink for OneShot {
    fn send(&mut self, frame: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.answer = frame.to_vec();
        Ok(())
    }

    fn recv(&mut self) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        self.hello
            .take()
            .ok_or_else(|| "no Hello in the claim".into())
    }
}

#[cfg(test)]
mod tests;
