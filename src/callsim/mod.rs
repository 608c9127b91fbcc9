//! Twilio-side call simulator (in progress).
