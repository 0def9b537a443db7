//! A one-pass reader of plain JSON (no escapes in strings) that hands out each value's
//! text; anything outside that subset makes it give up, so the caller can ask serde_json.
//!
//! It never accepts what serde_json rejects: every string is checked for control
//! characters, every number against JSON's grammar, and the text must be one value with
//! only whitespace around it. What it rejects it does not judge: `None` means "not plain".

/// How deep arrays and objects may nest before the reader gives up (serde_json allows 128).
const MAX_DEPTH: u32 = 64;

/// The bytes that end a plain string's scan: its closing quote, an escape, or a control
/// character (which JSON forbids in strings).
const STOPS_A_STRING: [bool; 256] = {
    let mut stops = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        stops[b] = true;
        b += 1;
    }
    stops[b'"' as usize] = true;
    stops[b'\\' as usize] = true;
    stops
};

pub(super) struct Skim<'a> {
    text: &'a str,
    pos: usize,
    depth: u32,
}

impl<'a> Skim<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Skim { text, pos: 0, depth: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// Whitespace, then nothing: the end of the document.
    pub(super) fn end(mut self) -> Option<()> {
        self.skip_whitespace();
        (self.pos == self.text.len()).then_some(())
    }

    /// A string with no escapes and no control characters; its contents.
    pub(super) fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let bytes = self.text.as_bytes();
        let start = self.pos;
        // One table lookup a byte: most strings here are ids and names of a few dozen
        // bytes, where memchr's set-up cost more than it saved (measured).
        let mut end = start;
        while let Some(&b) = bytes.get(end) {
            if STOPS_A_STRING[b as usize] {
                break;
            }
            end += 1;
        }
        if bytes.get(end) != Some(&b'"') {
            return None;
        }
        self.pos = end + 1;
        // Both ends are ASCII quotes, so char boundaries of text (already valid UTF-8).
        Some(&self.text[start..end])
    }

    /// A string (as [`Skim::string`]) after optional whitespace.
    pub(super) fn string_after_whitespace(&mut self) -> Option<&'a str> {
        self.skip_whitespace();
        self.string()
    }

    /// Any value after optional whitespace; its text, exactly as written.
    pub(super) fn value(&mut self) -> Option<&'a str> {
        self.skip_whitespace();
        let start = self.pos;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' => self.object(|_, skim| skim.value().map(drop))?,
            b'[' => self.array()?,
            b't' => self.literal("true")?,
            b'f' => self.literal("false")?,
            b'n' => self.literal("null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(&self.text[start..self.pos])
    }

    /// An object, after optional whitespace: `field` is called with each key and reads that
    /// key's value from the reader itself.
    pub(super) fn object(&mut self, mut field: impl FnMut(&'a str, &mut Self) -> Option<()>) -> Option<()> {
        self.skip_whitespace();
        self.eat(b'{')?;
        self.enter()?;
        self.skip_whitespace();
        if self.eat(b'}').is_none() {
            loop {
                self.skip_whitespace();
                let key = self.string()?;
                self.skip_whitespace();
                self.eat(b':')?;
                field(key, self)?;
                self.skip_whitespace();
                match self.peek()? {
                    b',' => self.pos += 1,
                    b'}' => {
                        self.pos += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(())
    }

    fn array(&mut self) -> Option<()> {
        self.eat(b'[')?;
        self.enter()?;
        self.skip_whitespace();
        if self.eat(b']').is_none() {
            loop {
                self.value()?;
                self.skip_whitespace();
                match self.peek()? {
                    b',' => self.pos += 1,
                    b']' => {
                        self.pos += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(())
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.text[self.pos..].starts_with(word).then(|| self.pos += word.len())
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        // A digit right after a leading zero ("01") is no number: left for serde_json.
        (!self.peek().is_some_and(|b| b.is_ascii_digit())).then_some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &str) -> Option<&str> {
        let mut skim = Skim::new(text);
        let v = skim.value()?;
        skim.end()?;
        Some(v)
    }

    #[test]
    fn reads_plain_json_as_written() {
        for text in ["{}", "[]", "\"a b\"", "0", "-0.5e+10", "12E3", "true", "false", "null", r#"{"a": [1, {"b": null}], "c": "d"}"#] {
            assert_eq!(whole(text), Some(text), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
        }
        assert_eq!(whole("  [1 ,2]\n"), Some("[1 ,2]"));
    }

    #[test]
    fn gives_up_on_what_is_not_plain_or_not_json() {
        for text in [
            r#""a\"b""#, "\"tab\there\"", "01", "1.", ".5", "-", "1e", "+1", "tru", "nul", "[1,]", "{\"a\":1,}", "{\"a\" 1}",
            "[1 2]", "{1:2}", "'a'", "[", "{", "\"open", "1 2", "NaN", "[] x", "\u{feff}{}",
        ] {
            assert_eq!(whole(text), None, "{text:?}");
        }
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(whole(&deep), None);
        let fine = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(whole(&fine).is_some());
    }
}
