#!/usr/bin/perl
# Runs one VMM command that boots Linux on a serial console and times its boot milestones from
# process start. Bounded: the whole process group is killed at the time limit, or as soon as the
# run has visibly ended (KVM internal error, panic, power-off) but the VMM stays alive (QEMU
# pauses the VM after a KVM internal error instead of exiting).
#
#   boot_timer.pl [--timeout SECONDS] [--log FILE] -- COMMAND [ARGS...]
#
# Prints one "name seconds" line per milestone ("-" when not reached), then
# "end SECONDS REASON", "last LINE" (the last guest console line) and "lasterr LINE" (the last
# line the command wrote to stderr), on stdout.
# The guest console is the command's stdout; its stderr is logged and searched too.
use strict;
use warnings;
use Getopt::Long qw(:config require_order);
use IO::Select;
use POSIX qw(:sys_wait_h setpgid);
use Time::HiRes qw(time sleep);

my $timeout = 300;
my $log_path;
GetOptions('timeout=f' => \$timeout, 'log=s' => \$log_path)
  or die "usage: boot_timer.pl [--timeout S] [--log FILE] -- COMMAND...\n";
@ARGV or die "boot_timer.pl: no command given\n";

# Milestones in boot order; the first match of each pattern counts.
my @milestones = (
    [first_byte    => undef],
    [linux_version => qr/Linux version \d/],
    [smpboot       => qr/smpboot: Allowing \d+ CPUs/],
    [console       => qr/printk: console \[ttyS\d+\] enabled|console \[ttyS\d+\] enabled/],
    [guest_init    => qr/xhyve-rs guest: Linux \S+ up/],
);
# A line that means the guest will make no more progress.
my @endings = (
    [qr/KVM internal error/i                => 'kvm-internal-error'],
    [qr/emulation failure/i                 => 'emulation-failure'],
    [qr/Kernel panic - not syncing/         => 'kernel-panic'],
    [qr/reboot: (Power down|System halted)/ => 'guest-poweroff'],
    [qr/triple fault|KVM_EXIT_SHUTDOWN/i    => 'shutdown'],
);
# After an ending line, keep reading this long so that the log holds the whole error report.
my $drain_after_end = 1.5;

my $log;
if (defined $log_path) {
    open($log, '>', $log_path) or die "boot_timer.pl: cannot write $log_path: $!\n";
    $log->autoflush(1);
}

pipe(my $out_r, my $out_w) or die "pipe: $!\n";
pipe(my $err_r, my $err_w) or die "pipe: $!\n";
my $start = time;
my $pid = fork() // die "fork: $!\n";
if ($pid == 0) {
    # Own process group, so that killing the run also kills whatever the command started.
    setpgid(0, 0);
    close $out_r;
    close $err_r;
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>&', $out_w);
    open(STDERR, '>&', $err_w);
    exec { $ARGV[0] } @ARGV or print STDERR "boot_timer.pl: cannot run $ARGV[0]: $!\n";
    POSIX::_exit(127);
}
setpgid($pid, $pid);    # also from this side: no race with the kill below
close $out_w;
close $err_w;

my $stop_requested = 0;
$SIG{INT} = $SIG{TERM} = sub { $stop_requested = 1 };

my %reached;
my ($end_time, $end_reason, $exit_status);
my $last_line = '';
my $last_err = '';
my %partial = (out => '', err => '');
my $select = IO::Select->new($out_r, $err_r);

sub elapsed { return sprintf('%.2f', time - $start) }

sub see_line {
    my ($stream, $line) = @_;
    $line =~ s/\r//g;
    print $log "[" . elapsed() . " $stream] $line\n" if $log;
    $last_line = $line if $stream eq 'out' && $line =~ /\S/;
    $last_err = $line if $stream eq 'err' && $line =~ /\S/;
    for my $m (@milestones) {
        my ($name, $re) = @$m;
        next if exists $reached{$name} || !defined $re;
        $reached{$name} = elapsed() if $line =~ $re;
    }
    return if defined $end_reason;
    for my $e (@endings) {
        if ($line =~ $e->[0]) {
            ($end_time, $end_reason) = (elapsed(), $e->[1]);
            last;
        }
    }
}

while ($select->count) {
    my $now = time;
    last if $stop_requested;
    if (!defined $end_reason && $now - $start >= $timeout) {
        ($end_time, $end_reason) = (elapsed(), 'timeout');
        last;
    }
    last if defined $end_reason && $now - $start >= $end_time + $drain_after_end;
    for my $fh ($select->can_read(0.05)) {
        my $stream = ($fh == $out_r) ? 'out' : 'err';
        my $n = sysread($fh, my $buf, 65536);
        if (!$n) {
            $select->remove($fh);
            next;
        }
        $reached{first_byte} //= elapsed() if $stream eq 'out';
        $partial{$stream} .= $buf;
        while ($partial{$stream} =~ s/^([^\n]*)\n//) {
            see_line($stream, $1);
        }
    }
}
for my $stream (qw(out err)) {
    see_line($stream, $partial{$stream}) if length $partial{$stream};
}

# Reap, or kill the whole group: TERM first, then KILL. A command that closed its output has
# about exited: give it a moment before calling it killed.
my $waited = waitpid($pid, WNOHANG);
if ($waited == 0 && !$select->count) {
    for (1 .. 40) {
        last if ($waited = waitpid($pid, WNOHANG)) != 0;
        sleep 0.05;
    }
}
if ($waited == 0) {
    kill 'TERM', -$pid;
    for (1 .. 40) {
        last if ($waited = waitpid($pid, WNOHANG)) != 0;
        sleep 0.05;
    }
    if ($waited == 0) {
        kill 'KILL', -$pid;
        waitpid($pid, 0);
    }
    $end_reason //= 'killed';
    $end_time //= elapsed();
} else {
    $exit_status = WIFEXITED($?) ? WEXITSTATUS($?) : 128 + WTERMSIG($?);
    $end_time //= elapsed();
    $end_reason = defined $end_reason ? "$end_reason,exit-$exit_status" : "exit-$exit_status";
}
$end_reason = 'interrupted' if $stop_requested && $end_reason eq 'killed';

for my $m (@milestones) {
    print "$m->[0] " . ($reached{$m->[0]} // '-') . "\n";
}
print "end $end_time $end_reason\n";
$last_line =~ s/\s+$//;
print "last $last_line\n";
$last_err =~ s/\s+$//;
print "lasterr $last_err\n";
exit 0;
