/*
 * vsock-echo: the test initramfs's vsock client and server (issue 14), built by
 * test/build-test-initramfs.sh into /bin/vsock-echo.
 *
 *   vsock-echo listen PORT         accept one stream on PORT, echo what it sends until it
 *                                  shuts down its side, then print "vsock-echo: echoed N bytes"
 *   vsock-echo connect CID PORT MSG
 *                                  connect to CID:PORT, send MSG, shut down the sending side,
 *                                  print "vsock-echo: got <reply>" once the peer closes
 *
 * Exit status 0 on success; 1 with "vsock-echo: <call>: error <errno>" otherwise.
 *
 * Freestanding x86_64 (raw system calls, no libc linked): a static glibc binary is 700 KB, which every
 * boot of the test kernel would unpack from the initramfs with ring-0 code that the build
 * machines emulate (about 9 emulated instructions a byte); this one is a few KB.
 */
/* Headers for constants and types only: nothing of libc is linked. */
#include <asm/errno.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

enum { SYS_read = 0, SYS_write = 1, SYS_close = 3, SYS_socket = 41, SYS_connect = 42,
       SYS_accept = 43, SYS_shutdown = 48, SYS_bind = 49, SYS_listen = 50, SYS_exit_group = 231 };

static long sys(long n, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

/* The compiler may call these for structure initialisation and copies. */
void *memset(void *s, int c, unsigned long n)
{
	unsigned char *p = s;
	while (n--)
		*p++ = (unsigned char)c;
	return s;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	unsigned char *dp = d;
	const unsigned char *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

static unsigned long length(const char *s)
{
	unsigned long n = 0;
	while (s[n])
		n++;
	return n;
}

static int write_all(long fd, const char *buf, unsigned long len)
{
	while (len > 0) {
		long n = sys(SYS_write, fd, (long)buf, (long)len);
		if (n == -EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (unsigned long)n;
	}
	return 0;
}

static void say(long fd, const char *s)
{
	write_all(fd, s, length(s));
}

static void say_number(long fd, unsigned long v)
{
	char buf[24];
	int i = sizeof(buf);
	buf[--i] = '\0';
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	say(fd, buf + i);
}

static int fail(const char *what, long err)
{
	say(2, "vsock-echo: ");
	say(2, what);
	say(2, ": error ");
	say_number(2, (unsigned long)-err);
	say(2, "\n");
	return 1;
}

/* A decimal number, or -1. */
static long number(const char *s)
{
	long v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > 0xffffffffL)
			return -1;
		v = v * 10 + (*s - '0');
	}
	return v > 0xffffffffL ? -1 : v;
}

static int do_listen(unsigned int port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	char buf[4096];
	unsigned long total = 0;
	long s = sys(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), c, r;
	if (s < 0)
		return fail("socket", s);
	if ((r = sys(SYS_bind, s, (long)&addr, sizeof(addr))) < 0)
		return fail("bind", r);
	if ((r = sys(SYS_listen, s, 1, 0)) < 0)
		return fail("listen", r);
	say(1, "vsock-echo: listening on port ");
	say_number(1, port);
	say(1, "\n");
	while ((c = sys(SYS_accept, s, 0, 0)) == -EINTR)
		;
	if (c < 0)
		return fail("accept", c);
	for (;;) {
		long n = sys(SYS_read, c, (long)buf, sizeof(buf));
		if (n == -EINTR)
			continue;
		if (n < 0)
			return fail("read", n);
		if (n == 0)
			break;
		if (write_all(c, buf, (unsigned long)n) < 0)
			return fail("write", -5);
		total += (unsigned long)n;
	}
	sys(SYS_close, c, 0, 0);
	sys(SYS_close, s, 0, 0);
	say(1, "vsock-echo: echoed ");
	say_number(1, total);
	say(1, " bytes\n");
	return 0;
}

static int do_connect(unsigned int cid, unsigned int port, const char *msg)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	char reply[4096];
	unsigned long got = 0;
	long s = sys(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), r;
	if (s < 0)
		return fail("socket", s);
	if ((r = sys(SYS_connect, s, (long)&addr, sizeof(addr))) < 0)
		return fail("connect", r);
	if (write_all(s, msg, length(msg)) < 0)
		return fail("write", -5);
	if ((r = sys(SYS_shutdown, s, SHUT_WR, 0)) < 0)
		return fail("shutdown", r);
	while (got < sizeof(reply) - 1) {
		long n = sys(SYS_read, s, (long)(reply + got), (long)(sizeof(reply) - 1 - got));
		if (n == -EINTR)
			continue;
		if (n < 0)
			return fail("read", n);
		if (n == 0)
			break;
		got += (unsigned long)n;
	}
	reply[got] = '\0';
	sys(SYS_close, s, 0, 0);
	say(1, "vsock-echo: got ");
	say(1, reply);
	say(1, "\n");
	return 0;
}

static int equal(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int run(int argc, char **argv)
{
	if (argc == 3 && equal(argv[1], "listen") && number(argv[2]) >= 0)
		return do_listen((unsigned int)number(argv[2]));
	if (argc == 5 && equal(argv[1], "connect") && number(argv[2]) >= 0 && number(argv[3]) >= 0)
		return do_connect((unsigned int)number(argv[2]), (unsigned int)number(argv[3]), argv[4]);
	say(2, "usage: vsock-echo listen PORT | vsock-echo connect CID PORT MSG\n");
	return 2;
}

/* The kernel enters with argc at the stack pointer and argv after it. */
__attribute__((used)) static void start(long *sp)
{
	sys(SYS_exit_group, run((int)sp[0], (char **)(sp + 1)), 0, 0);
}

__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %rbp, %rbp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start\n"
	"	hlt\n");
