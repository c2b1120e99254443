//! Legacy power and reset hardware: the ACPI PM1a blocks, PM timer and SMI command port,
//! the 0xCF9 reset control register, the i8042 keyboard controller's reset line, and the
//! POST code port.
//!
//! Port layout (as xhyve's FADT describes it): PM1a event 0x400-0x403, PM1a control
//! 0x404-0x405, PM timer 0x408-0x40B, SMI_CMD 0xB2.

use std::sync::Arc;
use std::time::Instant;

use super::bus::BusDevice;
use super::irq::InterruptLine;
use super::power::{PowerControl, PowerEvent};

/// Start of the PM1a event block; [`AcpiPm`] decodes `ACPI_PM_PORT_COUNT` ports from here.
pub const ACPI_PM_BASE: u16 = 0x400;
pub const ACPI_PM_PORT_COUNT: u64 = 0x0C;
pub const PM1A_EVT_PORT: u16 = 0x400;
pub const PM1A_CNT_PORT: u16 = 0x404;
pub const PM_TIMER_PORT: u16 = 0x408;
/// SMI command port; insert the same [`AcpiPm`] here with length 1.
pub const SMI_CMD_PORT: u16 = 0xB2;
pub const ACPI_ENABLE: u8 = 0xA0;
pub const ACPI_DISABLE: u8 = 0xA1;
/// The SCI's GSI (FADT SCI_INT).
pub const SCI_GSI: u32 = 9;
/// ACPI PM timer frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

pub const RESET_CONTROL_PORT: u16 = 0xCF9;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const POST_CODE_PORT: u16 = 0x80;

const PM1_TMR_STS: u16 = 1 << 0;
const PM1_BM_STS: u16 = 1 << 4;
const PM1_GBL_STS: u16 = 1 << 5;
const PM1_PWRBTN_STS: u16 = 1 << 8;
const PM1_SLPBTN_STS: u16 = 1 << 9;
const PM1_RTC_STS: u16 = 1 << 10;
const PM1_WAK_STS: u16 = 1 << 15;
const PM1_STS_BITS: u16 = PM1_TMR_STS
    | PM1_BM_STS
    | PM1_GBL_STS
    | PM1_PWRBTN_STS
    | PM1_SLPBTN_STS
    | PM1_RTC_STS
    | PM1_WAK_STS;
const PM1_PWRBTN_EN: u16 = 1 << 8;
/// TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN: each enable sits at its status bit.
const PM1_EN_BITS: u16 = PM1_TMR_STS | PM1_GBL_STS | PM1_PWRBTN_EN | PM1_SLPBTN_STS | PM1_RTC_STS;

const PM1_SCI_EN: u16 = 1 << 0;
const PM1_SLP_TYP_SHIFT: u16 = 10;
const PM1_SLP_TYP_MASK: u16 = 0x7 << PM1_SLP_TYP_SHIFT;
const PM1_SLP_EN: u16 = 1 << 13;
/// The SLP_TYP value our DSDT's `\_S5` package names.
const SLP_TYP_S5: u16 = 5;
/// BM_RLD, GBL_RLS and SLP_TYP: what the guest may write (SCI_EN is the firmware's, via
/// SMI_CMD; SLP_EN is write-only).
const PM1_CNT_WRITABLE: u16 = 0x0006 | PM1_SLP_TYP_MASK;

/// PM timer ticks after `nanos` nanoseconds, wrapping at 32 bits as the counter does.
pub fn pm_timer_ticks(nanos: u128) -> u32 {
    (nanos * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u32
}

/// Reads `len` bytes of a little-endian register starting at byte `at`.
fn read_bytes(value: u32, at: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = usize::try_from(at)
            .ok()
            .and_then(|at| bytes.get(at + i))
            .copied()
            .unwrap_or(0xFF);
    }
}

/// Merges a partial write of `data` at byte `at` into a 16-bit register; also returns the
/// mask of bytes written so write-1-to-clear registers only see the written bytes.
fn merge16(old: u16, at: u64, data: &[u8]) -> (u16, u16) {
    let mut bytes = old.to_le_bytes();
    let mut mask = [0u8; 2];
    for (i, &b) in data.iter().enumerate() {
        let Some(idx) = usize::try_from(at).ok().map(|a| a + i).filter(|&a| a < 2) else {
            break;
        };
        bytes[idx] = b;
        mask[idx] = 0xFF;
    }
    (u16::from_le_bytes(bytes), u16::from_le_bytes(mask))
}

/// The ACPI fixed hardware: PM1a event and control blocks, PM timer, SMI command port.
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    sci: Arc<dyn InterruptLine>,
    sci_asserted: bool,
    power: Arc<dyn PowerControl>,
    /// Nanoseconds on a monotonic clock, for the PM timer.
    clock: Box<dyn Fn() -> u128 + Send>,
}

impl AcpiPm {
    pub fn new(sci: Arc<dyn InterruptLine>, power: Arc<dyn PowerControl>) -> Self {
        let start = Instant::now();
        Self::with_clock(sci, power, Box::new(move || start.elapsed().as_nanos()))
    }

    /// With a monotonic nanosecond source for the PM timer (tests).
    pub fn with_clock(
        sci: Arc<dyn InterruptLine>,
        power: Arc<dyn PowerControl>,
        clock: Box<dyn Fn() -> u128 + Send>,
    ) -> Self {
        AcpiPm {
            status: 0,
            enable: 0,
            control: 0,
            sci,
            sci_asserted: false,
            power,
            clock,
        }
    }

    /// The power button (SIGTERM): sets PWRBTN_STS and raises the SCI if the guest enabled it.
    /// Returns whether the guest has ACPI enabled (SCI_EN, set by ACPI_ENABLE on SMI_CMD): if
    /// not, no OS is listening for the button, and xhyve stops instead.
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PM1_PWRBTN_STS;
        self.update_sci();
        self.control & PM1_SCI_EN != 0
    }

    /// Power-on: no status, no enables, ACPI off (SCI_EN clear), the SCI low. The PM timer
    /// keeps counting, as it does across a PC's reset.
    pub fn power_on_reset(&mut self) {
        self.status = 0;
        self.enable = 0;
        self.control = 0;
        self.update_sci();
    }

    /// Whether the guest enabled ACPI (SCI_EN), so that it would see the power button.
    pub fn acpi_enabled(&self) -> bool {
        self.control & PM1_SCI_EN != 0
    }

    /// The SCI is level-triggered: high while an enabled status bit is set and ACPI is on.
    fn update_sci(&mut self) {
        let want = self.control & PM1_SCI_EN != 0 && self.status & self.enable != 0;
        if want != self.sci_asserted {
            self.sci_asserted = want;
            self.sci.set_level(want);
        }
    }

    fn write_control(&mut self, value: u16) {
        self.control = (self.control & PM1_SCI_EN) | (value & PM1_CNT_WRITABLE);
        if value & PM1_SLP_EN != 0 {
            let sleep_type = (value & PM1_SLP_TYP_MASK) >> PM1_SLP_TYP_SHIFT;
            if sleep_type == SLP_TYP_S5 {
                self.power.request(PowerEvent::PowerOff);
            }
            // Other sleep states are not supported: the guest carries on as if it woke up.
        }
    }

    fn read_port(&mut self, port: u64, data: &mut [u8]) {
        const EVT: u64 = PM1A_EVT_PORT as u64;
        const CNT: u64 = PM1A_CNT_PORT as u64;
        const TMR: u64 = PM_TIMER_PORT as u64;
        match port {
            p if (EVT..EVT + 2).contains(&p) => read_bytes(u32::from(self.status), p - EVT, data),
            p if (EVT + 2..EVT + 4).contains(&p) => {
                read_bytes(u32::from(self.enable), p - EVT - 2, data)
            }
            p if (CNT..CNT + 2).contains(&p) => read_bytes(u32::from(self.control), p - CNT, data),
            p if (TMR..TMR + 4).contains(&p) => {
                read_bytes(pm_timer_ticks((self.clock)()), p - TMR, data)
            }
            p if p == u64::from(SMI_CMD_PORT) => data.fill(0),
            _ => data.fill(0xFF),
        }
    }

    fn write_port(&mut self, port: u64, data: &[u8]) {
        const EVT: u64 = PM1A_EVT_PORT as u64;
        const CNT: u64 = PM1A_CNT_PORT as u64;
        match port {
            p if (EVT..EVT + 2).contains(&p) => {
                let (value, written) = merge16(0, p - EVT, data);
                self.status &= !(value & written & PM1_STS_BITS);
                self.update_sci();
            }
            p if (EVT + 2..EVT + 4).contains(&p) => {
                let (value, _) = merge16(self.enable, p - EVT - 2, data);
                self.enable = value & PM1_EN_BITS;
                self.update_sci();
            }
            p if (CNT..CNT + 2).contains(&p) => {
                let (value, _) = merge16(self.control & !PM1_SLP_EN, p - CNT, data);
                self.write_control(value);
            }
            p if p == u64::from(SMI_CMD_PORT) => {
                match data.first() {
                    Some(&ACPI_ENABLE) => self.control |= PM1_SCI_EN,
                    Some(&ACPI_DISABLE) => self.control &= !PM1_SCI_EN,
                    _ => {}
                }
                self.update_sci();
            }
            // The timer is read-only.
            _ => {}
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.read_port(base + offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.write_port(base + offset, data);
    }
}

const RESET_CPU: u8 = 1 << 2;

/// The reset control register at 0xCF9: setting RST_CPU resets the machine.
/// The ACPI power button as SIGTERM and the control API press it.
pub trait PowerButton: Send + Sync {
    /// Presses it; says whether the guest listens (it enabled ACPI).
    fn press(&self) -> bool;
    /// Whether a press would be seen now.
    fn guest_listens(&self) -> bool;
}

impl PowerButton for std::sync::Mutex<AcpiPm> {
    fn press(&self) -> bool {
        super::bus::lock(self).press_power_button()
    }
    fn guest_listens(&self) -> bool {
        super::bus::lock(self).acpi_enabled()
    }
}

pub struct ResetControl {
    value: u8,
    power: Arc<dyn PowerControl>,
}

impl ResetControl {
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        ResetControl { value: 0, power }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.value;
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        // RST_CPU is self-clearing; the other bits (SYS_RST, FULL_RST) only qualify it.
        self.value = value & !RESET_CPU;
        if value & RESET_CPU != 0 {
            self.power.request(PowerEvent::Reset);
        }
    }
}

const KBC_STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// The system flag (POST passed) and "keyboard not inhibited".
const KBC_STATUS_IDLE: u8 = (1 << 2) | (1 << 4);
const KBC_READ_CONFIG: u8 = 0x20;
const KBC_WRITE_CONFIG: u8 = 0x60;
const KBC_SELF_TEST: u8 = 0xAA;
const KBC_SELF_TEST_PASSED: u8 = 0x55;
const KBC_PULSE_RESET: u8 = 0xFE;
/// Translation on, system flag: what firmware leaves in the command byte.
const KBC_DEFAULT_CONFIG: u8 = 0x44;

/// An i8042 with nothing plugged in: it answers the controller commands firmware and
/// kernels probe with, and resets the machine on command 0xFE.
pub struct I8042 {
    config: u8,
    output: Option<u8>,
    expecting_config: bool,
    power: Arc<dyn PowerControl>,
}

impl I8042 {
    /// Insert at `I8042_DATA_PORT` and at `I8042_COMMAND_PORT`, one port each.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        I8042 {
            config: KBC_DEFAULT_CONFIG,
            output: None,
            expecting_config: false,
            power,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match base + offset {
            p if p == u64::from(I8042_COMMAND_PORT) => {
                KBC_STATUS_IDLE | self.output.map_or(0, |_| KBC_STATUS_OUTPUT_FULL)
            }
            p if p == u64::from(I8042_DATA_PORT) => self.output.take().unwrap_or(0),
            _ => 0xFF,
        };
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match base + offset {
            p if p == u64::from(I8042_COMMAND_PORT) => {
                self.expecting_config = false;
                match value {
                    KBC_PULSE_RESET => self.power.request(PowerEvent::Reset),
                    KBC_READ_CONFIG => self.output = Some(self.config),
                    KBC_WRITE_CONFIG => self.expecting_config = true,
                    KBC_SELF_TEST => self.output = Some(KBC_SELF_TEST_PASSED),
                    _ => {}
                }
            }
            p if p == u64::from(I8042_DATA_PORT) => {
                // Bytes for a keyboard are dropped: there is none.
                let is_config = std::mem::take(&mut self.expecting_config);
                if is_config {
                    self.config = value;
                }
            }
            _ => {}
        }
    }
}

/// Port 0x80: firmware POST codes, and Linux's I/O delay. Remembers the last code.
#[derive(Default)]
pub struct PostCode {
    last: u8,
}

impl PostCode {
    pub fn last_code(&self) -> u8 {
        self.last
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.last);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.last = value;
        }
    }
}

impl super::PowerOnReset for AcpiPm {
    fn power_on_reset(&mut self) {
        AcpiPm::power_on_reset(self);
    }
}

impl super::PowerOnReset for I8042 {
    fn power_on_reset(&mut self) {
        self.config = KBC_DEFAULT_CONFIG;
        self.output = None;
        self.expecting_config = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::test_util::RecordingLine;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct RecordingPower(Mutex<Vec<PowerEvent>>);
    impl PowerControl for RecordingPower {
        fn request(&self, event: PowerEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    struct Pm {
        dev: AcpiPm,
        sci: Arc<RecordingLine>,
        power: Arc<RecordingPower>,
        now: Arc<AtomicU64>,
    }

    fn pm() -> Pm {
        let sci = Arc::new(RecordingLine {
            gsi: SCI_GSI,
            ..Default::default()
        });
        let power = Arc::new(RecordingPower::default());
        let now = Arc::new(AtomicU64::new(0));
        let clock_now = now.clone();
        let dev = AcpiPm::with_clock(
            sci.clone(),
            power.clone(),
            Box::new(move || u128::from(clock_now.load(Ordering::SeqCst))),
        );
        Pm {
            dev,
            sci,
            power,
            now,
        }
    }

    fn out(dev: &mut dyn BusDevice, port: u16, data: &[u8]) {
        dev.write(u64::from(port), 0, data);
    }

    fn inw(dev: &mut dyn BusDevice, port: u16) -> u16 {
        let mut d = [0u8; 2];
        dev.read(u64::from(port), 0, &mut d);
        u16::from_le_bytes(d)
    }

    fn inl(dev: &mut dyn BusDevice, port: u16) -> u32 {
        let mut d = [0u8; 4];
        dev.read(u64::from(port), 0, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn s5_sleep_powers_off() {
        let mut pm = pm();
        out(&mut pm.dev, PM1A_CNT_PORT, &(5u16 << 10).to_le_bytes());
        assert!(
            pm.power.0.lock().unwrap().is_empty(),
            "SLP_TYP alone does nothing"
        );
        out(
            &mut pm.dev,
            PM1A_CNT_PORT,
            &((5u16 << 10) | PM1_SLP_EN).to_le_bytes(),
        );
        assert_eq!(*pm.power.0.lock().unwrap(), vec![PowerEvent::PowerOff]);
        // SLP_EN reads as zero.
        assert_eq!(inw(&mut pm.dev, PM1A_CNT_PORT) & PM1_SLP_EN, 0);
    }

    #[test]
    fn other_sleep_types_do_not_power_off() {
        let mut pm = pm();
        out(
            &mut pm.dev,
            PM1A_CNT_PORT,
            &((1u16 << 10) | PM1_SLP_EN).to_le_bytes(),
        );
        assert!(pm.power.0.lock().unwrap().is_empty());
    }

    #[test]
    fn smi_cmd_switches_sci_en_which_the_guest_cannot_write() {
        let mut pm = pm();
        out(&mut pm.dev, PM1A_CNT_PORT, &[0x01, 0x00]);
        assert_eq!(inw(&mut pm.dev, PM1A_CNT_PORT) & PM1_SCI_EN, 0);
        pm.dev.write(u64::from(SMI_CMD_PORT), 0, &[ACPI_ENABLE]);
        assert_eq!(inw(&mut pm.dev, PM1A_CNT_PORT) & PM1_SCI_EN, 1);
        out(&mut pm.dev, PM1A_CNT_PORT, &[0x00, 0x00]);
        assert_eq!(inw(&mut pm.dev, PM1A_CNT_PORT) & PM1_SCI_EN, 1);
        pm.dev.write(u64::from(SMI_CMD_PORT), 0, &[ACPI_DISABLE]);
        assert_eq!(inw(&mut pm.dev, PM1A_CNT_PORT) & PM1_SCI_EN, 0);
    }

    #[test]
    fn power_button_raises_a_level_sci_until_cleared() {
        let mut pm = pm();
        // Not enabled yet: status set, no SCI, and the caller learns nobody listens.
        assert!(!pm.dev.press_power_button());
        assert_eq!(inw(&mut pm.dev, PM1A_EVT_PORT), PM1_PWRBTN_STS);
        assert!(pm.sci.levels.lock().unwrap().is_empty());
        out(&mut pm.dev, PM1A_EVT_PORT + 2, &PM1_PWRBTN_EN.to_le_bytes());
        assert!(pm.sci.levels.lock().unwrap().is_empty(), "SCI_EN still off");
        pm.dev.write(u64::from(SMI_CMD_PORT), 0, &[ACPI_ENABLE]);
        assert_eq!(*pm.sci.levels.lock().unwrap(), vec![true]);
        // Writing 0 to the status leaves it; writing 1 clears it and lowers the SCI.
        out(&mut pm.dev, PM1A_EVT_PORT, &[0x00, 0x00]);
        assert_eq!(inw(&mut pm.dev, PM1A_EVT_PORT), PM1_PWRBTN_STS);
        out(&mut pm.dev, PM1A_EVT_PORT + 1, &[0x01]);
        assert_eq!(inw(&mut pm.dev, PM1A_EVT_PORT), 0);
        assert_eq!(*pm.sci.levels.lock().unwrap(), vec![true, false]);
        // Pressed again while enabled: straight up.
        assert!(pm.dev.press_power_button());
        assert_eq!(*pm.sci.levels.lock().unwrap(), vec![true, false, true]);
    }

    #[test]
    fn a_machine_reset_turns_acpi_off_and_lowers_the_sci() {
        let mut pm = pm();
        out(&mut pm.dev, PM1A_EVT_PORT + 2, &PM1_PWRBTN_EN.to_le_bytes());
        pm.dev.write(u64::from(SMI_CMD_PORT), 0, &[ACPI_ENABLE]);
        assert!(pm.dev.press_power_button());
        assert_eq!(*pm.sci.levels.lock().unwrap(), vec![true]);
        pm.dev.power_on_reset();
        assert_eq!(*pm.sci.levels.lock().unwrap(), vec![true, false]);
        assert_eq!(inw(&mut pm.dev, PM1A_EVT_PORT), 0, "status clear");
        assert_eq!(inw(&mut pm.dev, PM1A_EVT_PORT + 2), 0, "enables clear");
        assert!(
            !pm.dev.acpi_enabled(),
            "SCI_EN off until the guest enables ACPI again"
        );
        assert!(!pm.dev.press_power_button(), "nobody listens yet");
    }

    #[test]
    fn enable_register_keeps_only_defined_bits() {
        let mut pm = pm();
        out(&mut pm.dev, PM1A_EVT_PORT + 2, &[0xFF, 0xFF]);
        assert_eq!(inw(&mut pm.dev, PM1A_EVT_PORT + 2), PM1_EN_BITS);
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz_and_wraps() {
        let mut pm = pm();
        assert_eq!(inl(&mut pm.dev, PM_TIMER_PORT), 0);
        pm.now.store(1_000_000_000, Ordering::SeqCst);
        assert_eq!(inl(&mut pm.dev, PM_TIMER_PORT), 3_579_545);
        // Byte access to the top byte.
        let mut b = [0u8];
        pm.dev.read(u64::from(PM_TIMER_PORT), 2, &mut b);
        assert_eq!(b[0], (3_579_545u32 >> 16) as u8);
        let wrap_ns = (1u128 << 32) * 1_000_000_000 / u128::from(PM_TIMER_HZ);
        assert!(pm_timer_ticks(wrap_ns + 1_000_000) < 4000);
    }

    #[test]
    fn reset_control_resets_on_rst_cpu() {
        let power = Arc::new(RecordingPower::default());
        let mut rc = ResetControl::new(power.clone());
        out(&mut rc, RESET_CONTROL_PORT, &[0x02]);
        assert!(power.0.lock().unwrap().is_empty());
        let mut b = [0u8];
        rc.read(u64::from(RESET_CONTROL_PORT), 0, &mut b);
        assert_eq!(b[0], 0x02);
        out(&mut rc, RESET_CONTROL_PORT, &[0x06]);
        assert_eq!(*power.0.lock().unwrap(), vec![PowerEvent::Reset]);
    }

    fn inb(dev: &mut dyn BusDevice, port: u16) -> u8 {
        let mut b = [0u8];
        dev.read(u64::from(port), 0, &mut b);
        b[0]
    }

    #[test]
    fn i8042_is_idle_answers_probes_and_resets_on_fe() {
        let power = Arc::new(RecordingPower::default());
        let mut kbc = I8042::new(power.clone());
        assert_eq!(inb(&mut kbc, I8042_COMMAND_PORT) & 0x03, 0, "buffers empty");
        out(&mut kbc, I8042_COMMAND_PORT, &[KBC_SELF_TEST]);
        assert_eq!(inb(&mut kbc, I8042_COMMAND_PORT) & 0x01, 1);
        assert_eq!(inb(&mut kbc, I8042_DATA_PORT), 0x55);
        assert_eq!(inb(&mut kbc, I8042_COMMAND_PORT) & 0x01, 0);
        out(&mut kbc, I8042_COMMAND_PORT, &[KBC_WRITE_CONFIG]);
        out(&mut kbc, I8042_DATA_PORT, &[0x65]);
        out(&mut kbc, I8042_COMMAND_PORT, &[KBC_READ_CONFIG]);
        assert_eq!(inb(&mut kbc, I8042_DATA_PORT), 0x65);
        out(&mut kbc, I8042_COMMAND_PORT, &[0xAD]);
        assert!(power.0.lock().unwrap().is_empty());
        out(&mut kbc, I8042_COMMAND_PORT, &[0xFE]);
        assert_eq!(*power.0.lock().unwrap(), vec![PowerEvent::Reset]);
    }

    #[test]
    fn post_code_port_remembers_the_last_code() {
        let mut post = PostCode::default();
        out(&mut post, POST_CODE_PORT, &[0x42]);
        assert_eq!(post.last_code(), 0x42);
        assert_eq!(inb(&mut post, POST_CODE_PORT), 0x42);
    }
}
